"""Issue 15, one recipe layer: every shipped recipe and every key accepted before loads with the same
meaning; a `version` on every recipe root (refused in one line when unknown, written into recipe.yaml);
one budget check, with one message, for the protected blocks of ptq and train recipes."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lpq.config import from_dict, load_config, to_dict
from lpq.eval.recipe import EvalRecipe
from lpq.eval.settings import DomainEvalSettings, Split
from lpq.pipelines.export import ExportRecipe
from lpq.pipelines.inspect import InspectRecipe, load_inspect_recipe
from lpq.pipelines.ptq_config import PTQConfig
from lpq.schema import RecipeVersion
from lpq.train.recipe import CompareMode, DomainEvalConfig, LrSchedule, TrainRecipe
from tests.cli.helpers import error_line, lpq, snapshot

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WORDS = " ".join(f"w{(i * 7919) % 990 + 4}" for i in range(600))


def _recipe_class(name: str) -> type:
    if name.startswith(("w4a", "ptq_")):
        return PTQConfig
    return {"smollm2_hif8": TrainRecipe, "wan21_hif8": TrainRecipe, "pangu1b_hif8": TrainRecipe,
            "eval_smollm2_hif4": EvalRecipe, "export_smollm2_hif4": ExportRecipe,
            "inspect_tiny_wan22": InspectRecipe}[name]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_as_version_1_and_round_trips(path):
    cls = _recipe_class(path.stem)
    recipe = load_inspect_recipe(path) if cls is InspectRecipe else load_config(path, cls)
    assert recipe.version is RecipeVersion.V1
    written = yaml.safe_load(path.read_text()).get("version")
    assert written == 1
    data = to_dict(recipe)
    assert next(iter(data)) == "version" and data["version"] == 1
    assert from_dict(data, cls) == recipe


def test_ptq_recipe_keys_of_before_load_with_the_same_meaning(tmp_path):
    (tmp_path / "calib.txt").write_text(WORDS)
    (tmp_path / "r.yaml").write_text("""model: {id: tiny-llama}
quant: {format: hif4}
calibration: {text_file: calib.txt, num_sequences: 2, seq_len: 16, batch_size: 2}
algorithms: [{name: rtn}]
protect: {blocks: [1]}
evaluation: {wikitext2: calib.txt, windows: 2, seq_len: 16, kl_windows: 1, batch_size: 1,
             domains: [pydoc, fortunes], domain_windows: 3}
""")
    cfg = load_config(tmp_path / "r.yaml", PTQConfig)
    assert cfg.version is RecipeVersion.V1
    ev = cfg.evaluation
    assert (ev.wikitext2, ev.windows, ev.seq_len, ev.kl_windows, ev.batch_size) == (tmp_path / "calib.txt", 2, 16, 1, 1)
    # The domains are scored as before: validation parts, 3 windows each, the section's length and batch.
    assert ev.domain_eval == DomainEvalSettings(domains=["pydoc", "fortunes"], split=Split.VALID, windows=3,
                                                seq_len=16, batch_size=1)


def test_train_recipe_keys_of_before_load_with_the_same_meaning(tmp_path):
    (tmp_path / "t.yaml").write_text("""model: {id: tiny-llama}
quant: {format: hif8}
train: {lr_schedule: linear, compare: [delayed, current], flow: {expert: transformer_2}}
domain_eval: {domains: [gsm8k, chat], split: valid, windows: 5, seq_len: 64, batch_size: 3, data_dir: /data,
              held_out: false, bootstrap: 300}
""")
    r = load_config(tmp_path / "t.yaml", TrainRecipe)
    assert r.version is RecipeVersion.V1 and r.train.lr_schedule is LrSchedule.LINEAR
    assert r.train.compare == [CompareMode.DELAYED, CompareMode.CURRENT] and r.train.flow.expert == "transformer_2"
    assert r.domain_eval == DomainEvalConfig(domains=["gsm8k", "chat"], split=Split.VALID, windows=5, seq_len=64,
                                             batch_size=3, data_dir="/data", held_out=False, bootstrap=300)
    # Choices are written back as the strings they were read from.
    data = to_dict(r)
    assert data["train"]["compare"] == ["delayed", "current"] and data["domain_eval"]["split"] == "valid"


PTQ = ("model: {id: tiny-llama}\nquant: {format: hif4}\ncalibration: {text_file: calib.txt, num_sequences: 2, "
       "seq_len: 16, batch_size: 2}\nalgorithms: [{name: rtn}]\nprotect: {blocks: []}\nexport: null\nthreads: 1\n"
       "evaluation: {wikitext2: calib.txt, windows: 1, seq_len: 16}\n")
TRAIN = ("model: {id: tiny-llama}\nquant: {weight: {format: hif8, scaling: current}}\ndata: {paths: [corpus.txt], "
         "seq_len: 16, eval_blocks: 1}\ntrain: {output_dir: run, steps: 2, batch_size: 1, bf16_warmup_steps: 1, "
         "reference_run: false, log_every: 1}\n")


@pytest.mark.parametrize("command, text, args", [
    ("ptq", PTQ, ["--out", "o"]),
    ("train", TRAIN, []),
    ("eval", "model: {id: tiny-llama}\nquant: {format: hif4}\n", ["--out", "o"]),
    ("export", "model: {id: tiny-llama}\nquant: {format: mxfp4}\n", ["--out", "o"]),
    ("inspect", "model: {id: tiny-llama}\nquant: {format: mxfp4}\n", []),
    ("prepare-data", "model: {id: tiny-wan21}\ndata: {kind: wan_latents, cache_dir: cache}\n", []),
])
def test_an_unknown_version_is_one_line_naming_the_file_and_the_allowed_versions(tmp_path, monkeypatch, command,
                                                                                 text, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(WORDS)
    path = tmp_path / "r.yaml"
    path.write_text("version: 2\n" + text)
    before = snapshot(tmp_path)
    code, out = lpq(command, "--config", path, *args)
    assert code == 2 and f"{path}:1: 'version': 2 is not allowed; use one of 1" in error_line(out)
    assert snapshot(tmp_path) == before


def test_saved_recipes_carry_the_version(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text(WORDS)
    (tmp_path / "corpus.txt").write_text(WORDS)
    (tmp_path / "p.yaml").write_text(PTQ)                  # written before `version` existed
    code, out = lpq("ptq", "--config", tmp_path / "p.yaml", "--out", tmp_path / "p")
    assert code == 0, out
    assert (tmp_path / "p" / "recipe.yaml").read_text().startswith("version: 1\n")
    (tmp_path / "t.yaml").write_text(TRAIN)
    code, out = lpq("train", "--config", tmp_path / "t.yaml")
    assert code == 0, out
    saved = tmp_path / "run" / "recipe.yaml"
    assert saved.read_text().startswith("version: 1\n") and load_config(saved, TrainRecipe).train.steps == 2


BUDGET = re.compile(r"(\d+) protected blocks exceed the challenge budget of (\d+) for (\S+) \((\S+)\); set "
                    r"quant\.allow_over_budget: true for research runs outside the challenge$")


@pytest.mark.parametrize("command, text, expected", [
    ("ptq", PTQ.replace("protect: {blocks: []}", "protect: {auto: 3}"), ("3", "2", "hif4", "protect.auto")),
    # Mixed formats: the strictest budget, named by its format (this said "the budget for mxfp4 is 2").
    ("ptq", PTQ.replace("quant: {format: hif4}", "quant: {weight: {format: mxfp4}, input: {format: hif4}}")
               .replace("protect: {blocks: []}", "protect: {blocks: [0, 1, 2]}"), ("3", "2", "hif4", "protect.blocks")),
    ("train", TRAIN.replace("scaling: current}}", "scaling: current}, protected_blocks: [0, 1, 2, 3, 4, 5]}"),
     ("6", "5", "hif8", "quant.protected_blocks")),
    ("export", "model: {id: tiny-llama}\nquant: {format: mxfp4, protected_blocks: [0, 1, 2, 3, 4, 5]}\n",
     ("6", "5", "mxfp4", "quant.protected_blocks")),
])
def test_protected_blocks_over_the_budget_one_check_one_message(tmp_path, command, text, expected):
    (tmp_path / "calib.txt").write_text(WORDS)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    before = snapshot(tmp_path)
    code, out = lpq(command, "--config", path, *(["--out", tmp_path / "o"] if command != "train" else []))
    found = BUDGET.search(error_line(out))
    assert code == 2 and found and found.groups() == expected, out
    assert snapshot(tmp_path) == before
    # allow_over_budget lifts it for research runs, in either recipe
    lifted = text.replace("quant: {", "quant: {allow_over_budget: true, ")
    path.write_text(lifted)
    cls = {"ptq": PTQConfig, "train": TrainRecipe, "export": ExportRecipe}[command]
    assert load_config(path, cls).version is RecipeVersion.V1
