"""The step protocol: a step defined here, with no edit under lpq/, runs through `lpq ptq`."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from lpq.algorithms.step import Phase, Step, StepSpec, check_order, register
from lpq.config import ConfigError, load_config
from lpq.pipelines import ptq
from lpq.pipelines.ptq_config import PTQConfig

CALLS: list[tuple] = []


@dataclass
class CountingSettings:
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


@register
class CountingStep(Step):
    """Records every hook, scales each quantized weight by `scale` (a visible, checkpointed effect)
    and counts the blocks it has seen in its state."""

    name = "test_counting"
    Settings = CountingSettings
    phase = Phase.TRANSFORM

    def __init__(self, settings=None):
        super().__init__(settings)
        self.blocks_seen = 0

    def on_model_start(self, run):
        CALLS.append(("model_start",))

    def on_prepare_block(self, run, block):
        CALLS.append(("prepare", block.index, block.inputs is None))

    def on_block_start(self, run, block):
        CALLS.append(("block_start", block.index, len(block.inputs)))
        with torch.no_grad():
            for lin in block.linears().values():
                lin.weight.mul_(self.settings.scale)

    def on_block_end(self, run, block):
        self.blocks_seen += 1
        CALLS.append(("block_end", block.index, all(l.quant_enabled for l in block.linears().values())))

    def on_model_end(self, run):
        CALLS.append(("model_end", self.blocks_seen))
        return {"test_counting": {"blocks_seen": self.blocks_seen}}

    def state_dict(self):
        return {"blocks_seen": self.blocks_seen}

    def load_state_dict(self, state):
        self.blocks_seen = state["blocks_seen"]


def _recipe(tmp_path: Path, scale: float = 2.0) -> dict:
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7919) % 990 + 4}" for i in range(600)))
    return {"model": {"id": "tiny-llama"}, "quant": {"format": "hif4"},
            "calibration": {"text_file": str(text), "num_sequences": 2, "seq_len": 16, "batch_size": 2},
            "algorithms": [{"name": "test_counting", "scale": scale}, {"name": "rtn"}],
            "protect": {"blocks": []}, "evaluation": None, "export": None, "threads": 1}


def test_a_step_registered_outside_lpq_runs_through_the_pipeline(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path)))
    cfg = load_config(recipe, PTQConfig)
    CALLS.clear()
    report = ptq.run(cfg, tmp_path / "out")
    assert CALLS == [("model_start",), ("prepare", 0, True), ("prepare", 1, True),
                     ("block_start", 0, 1), ("block_end", 0, True),
                     ("block_start", 1, 1), ("block_end", 1, True), ("model_end", 2)]
    assert report["test_counting"] == {"blocks_seen": 2}
    assert report["algorithms"][0] == {"name": "test_counting", "scale": 2.0}
    stored = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert stored["algorithms"][0] == {"name": "test_counting", "scale": 2.0}


def test_its_state_is_checkpointed_and_restored_on_resume(tmp_path, monkeypatch):
    from lpq.config import from_dict

    cfg = from_dict(_recipe(tmp_path), PTQConfig)
    real, calls = ptq.process_block, {"n": 0}

    def dies_on_second_block(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ptq, "process_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        ptq.run(cfg, tmp_path / "out")
    saved = torch.load(tmp_path / "out" / "checkpoint" / "block_0000.pt", weights_only=False)
    assert saved["steps"]["test_counting"] == {"blocks_seen": 1}
    monkeypatch.setattr(ptq, "process_block", real)
    report = ptq.run(cfg, tmp_path / "out")
    assert report["resumed_from_block"] == 1 and report["test_counting"] == {"blocks_seen": 2}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["test_counting"]["blocks_seen"] == 2


def test_settings_are_validated_with_file_and_key(tmp_path):
    d = _recipe(tmp_path)
    p = tmp_path / "r.yaml"
    d["algorithms"][0]["scale"] = -1.0
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: .*scale must be > 0"):
        load_config(p, PTQConfig)
    d["algorithms"][0] = {"name": "test_counting", "alpha": 1}
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: .*'test_counting' has no setting 'alpha'; its settings: scale"):
        load_config(p, PTQConfig)


def test_a_name_alone_is_the_step_with_its_default_settings(tmp_path):
    d = _recipe(tmp_path)
    d["algorithms"][0] = "test_counting"
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    spec = load_config(p, PTQConfig).algorithms[0]
    assert spec == StepSpec("test_counting", CountingSettings())
    d["algorithms"][0] = "no_such_step"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+: .*no_such_step"):
        load_config(p, PTQConfig)


def test_order_rules_come_from_phases_not_names():
    with pytest.raises(ValueError, match="test_counting must come before the weight quantizer rtn"):
        check_order([StepSpec("rtn"), StepSpec("test_counting")])
    with pytest.raises(ValueError, match="exactly one weight quantizer"):
        check_order([StepSpec("test_counting")])
    with pytest.raises(ValueError, match="once"):
        check_order([StepSpec("test_counting"), StepSpec("test_counting"), StepSpec("rtn")])


def test_registration_is_checked():
    class NoPhase(Step):
        name = "test_no_phase"

    with pytest.raises(TypeError, match="needs a `name` and a `phase`"):
        register(NoPhase)

    class Clash(Step):
        name = "gptq"
        phase = Phase.QUANTIZE

    from lpq.algorithms.step import step_class

    step_class("gptq")
    with pytest.raises(ValueError, match="already taken"):
        register(Clash)
