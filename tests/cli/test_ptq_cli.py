"""`lpq ptq` through the real CLI: each bad input of issue 15 is one `error:` line, exit code 2, before
any block is quantized, and no user file is touched."""
from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.cli.helpers import error_line, lpq, lpq_process, snapshot, user_folder

WORDS = " ".join(f"w{(i * 7919) % 990 + 4}" for i in range(600))


def _recipe(tmp_path, **change) -> dict:
    (tmp_path / "calib.txt").write_text(WORDS)
    d = {"model": {"id": "tiny-llama"}, "quant": {"format": "hif4"},
         "calibration": {"text_file": "calib.txt", "num_sequences": 2, "seq_len": 16, "batch_size": 2},
         "algorithms": [{"name": "rtn"}], "protect": {"blocks": []},
         "evaluation": {"wikitext2": "calib.txt", "windows": 1, "seq_len": 16}, "export": None, "threads": 1}
    for section, value in change.items():
        d[section] = {**d[section], **value} if isinstance(d.get(section), dict) and value is not None else value
    return d


def _write(tmp_path, d: dict, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.parametrize("change,message", [
    ({"protect": {"blocks": [9]}}, "protect.blocks: block 9 is out of range: tiny-llama has 2 blocks"),
    ({"algorithms": [{"name": "gptq", "damp": -0.1}]}, r"algorithms\[0\]'?: .*damp must be in \[0, 1\)"),
    ({"algorithms": [{"name": "smoothquant", "alpha": 1.5}, {"name": "rtn"}]}, r"alpha must be in \[0, 1\]"),
    ({"evaluation": {"windows": -1}}, "windows must be >= 0"),
    ({"calibration": {"text_file": "missing.txt"}}, "calibration.text_file: .*missing.txt not found"),
    ({"evaluation": {"wikitext2": "missing.txt"}}, "evaluation.wikitext2: .*missing.txt not found"),
    ({"calibration": {"num_sequences": 60}}, "holds 37 windows of 16 tokens .*fewer than the 60 asked for"),
    ({"calibration": {"seq_len": 999}}, "calibration.seq_len: 999 tokens is beyond tiny-llama's context of 256"),
    ({"protect": {"blocks": None, "auto": 1, "sequences": 0}}, "protect needs sequences >= 1"),
    ({"skip_linears": ["mlp.nonexistent"]}, r"'\*.mlp.nonexistent' matches no module"),
    ({"model": {"dtype": "float16"},
      "algorithms": [{"name": "rtn"}, {"name": "norm_distill", "steps": 1, "sequences": 1, "seq_len": 8}]},
     "float16 overflows"),
    # a step that needs the format's block grid, refused as the recipe is read (not after the model loads)
    ({"quant": {"format": "hif8"}, "algorithms": [{"name": "gptq"}]},
     r"r.yaml:\d+: gptq: format 'hif8' has no block grid for the PTQ algorithms"),
])
def test_bad_values_are_one_line_errors_before_any_work(tmp_path, change, message):
    recipe = _write(tmp_path, _recipe(tmp_path, **change))
    before = snapshot(tmp_path)
    code, out = lpq("ptq", "--config", recipe, "--out", tmp_path / "out")
    assert code == 2 and __import__("re").search(message, error_line(out)), out
    assert not (tmp_path / "out" / "checkpoint").exists()              # nothing was quantized
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before


@pytest.mark.parametrize("quant, algorithms, kind, message", [
    ({"format": "hif4"}, [{"name": "rtn"}], "compressed-tensors",
     r"r.yaml:\d+: export kind compressed-tensors stores mxfp4, mxfp4-rceil, mxfp4-toolkit, nvfp4 weights, the "
     r"recipe has hif4 weights"),
    ({"format": "mxfp4"}, [{"name": "rtn"}, {"name": "norm_distill", "input_scales": True}], "compressed-tensors",
     r"r.yaml:\d+: norm_distill leaves an online input scale on quantized linears .* export kind compressed-tensors "
     r"cannot run"),
    ({"weight": {"format": "mxfp4"}}, [{"name": "hadamard"}, {"name": "rtn"}], "gguf",
     r"r.yaml:\d+: hadamard leaves an online input rotation on quantized linears .* export kind gguf cannot run"),
    ({"format": "mxfp4"}, [{"name": "rtn"}], "gguf", r"r.yaml:\d+: kind gguf is weight-only"),
])
def test_an_export_its_runtime_cannot_hold_is_refused_before_the_blocks(tmp_path, quant, algorithms, kind, message):
    """For vLLM / llama.cpp: refused as the recipe is read, not after the last block (hours on a 32B model)."""
    d = {**_recipe(tmp_path), "quant": quant, "algorithms": algorithms, "export": {"kind": kind}}
    code, out = lpq("ptq", "--config", _write(tmp_path, d), "--out", tmp_path / "out")
    assert code == 2 and __import__("re").search(message, error_line(out)), out
    assert not (tmp_path / "out").exists()


def test_empty_calibration_text(tmp_path):
    recipe = _write(tmp_path, _recipe(tmp_path))
    (tmp_path / "calib.txt").write_text("   \n")
    code, out = lpq("ptq", "--config", recipe, "--out", tmp_path / "out")
    assert code == 2 and "calibration.text_file" in error_line(out) and "holds no text" in out


def test_the_recipe_runs_from_any_working_folder(tmp_path):
    """Input files are relative to the recipe file, not to the working folder."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    recipe = _write(folder, _recipe(folder))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out = lpq_process("ptq", "--config", recipe, "--out", "run", cwd=elsewhere, timeout=300)
    assert code == 0, out
    assert json.loads((elsewhere / "run" / "report.json").read_text())["quantized"]["wikitext2_ppl"] > 1


def test_out_of_user_files_is_never_written(tmp_path):
    recipe = _write(tmp_path, _recipe(tmp_path))
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    code, out = lpq("ptq", "--config", recipe, "--out", mine, "--force")
    assert code == 2 and "was not written by lpq" in error_line(out)
    assert snapshot(mine) == before


def test_a_finished_run_of_another_recipe_needs_force(tmp_path):
    """Case 2: a rerun with a different recipe does not replace a finished run without --force; with
    --force and the same blocks it reruns only what differs; a user's file in the folder is kept."""
    recipe = _write(tmp_path, _recipe(tmp_path))
    code, out = lpq("ptq", "--config", recipe, "--model", "tiny-llama", "--out", tmp_path / "out")
    assert code == 0 and "resolved recipe" in out and "id: tiny-llama" in out    # an override: what runs is shown
    (tmp_path / "out" / "my_notes.txt").write_text("mine")
    report = (tmp_path / "out" / "report.json").read_text()
    other = _write(tmp_path, _recipe(tmp_path, evaluation={"windows": 1, "seq_len": 8}), "other.yaml")
    code, out = lpq("ptq", "--config", other, "--out", tmp_path / "out")
    assert code == 2 and "holds a finished run of another recipe" in error_line(out) and "--force" in out
    assert (tmp_path / "out" / "report.json").read_text() == report
    code, out = lpq("ptq", "--config", other, "--out", tmp_path / "out", "--force")
    assert code == 0, out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["resumed_from_block"] == 2
    assert (tmp_path / "out" / "my_notes.txt").read_text() == "mine"
    blocks = _write(tmp_path, _recipe(tmp_path, algorithms=[{"name": "gptq"}]), "blocks.yaml")
    code, out = lpq("ptq", "--config", blocks, "--out", tmp_path / "out", "--force")
    assert code == 2 and "holds files lpq did not write (my_notes.txt)" in error_line(out)


@pytest.mark.slow
def test_two_runs_into_one_folder_at_once(tmp_path):
    """Case 3: the second run into a folder in use stops with a clear message; the first finishes."""
    import subprocess
    import sys

    from tests.cli.helpers import OFFLINE

    slow = _write(tmp_path, _recipe(tmp_path, algorithms=[{"name": "gptq"}],
                                    calibration={"num_sequences": 8, "seq_len": 32, "batch_size": 2}), "slow.yaml")
    other = _write(tmp_path, _recipe(tmp_path, quant={"format": "mxfp4"}), "other.yaml")
    first = subprocess.Popen([sys.executable, "-m", "lpq.cli", "ptq", "--config", slow, "--out", tmp_path / "out"],
                             env={**__import__("os").environ, **OFFLINE}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.lpq-lock")) and time.time() < deadline:
        time.sleep(0.2)
    code, out = lpq_process("ptq", "--config", other, "--out", tmp_path / "out", "--force")
    assert code == 2 and "in use by another lpq run" in error_line(out)
    assert first.wait(timeout=600) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert report["format"] == recipe["quant"]["format"] == "hif4"


def test_presets_resolve_to_the_shipped_recipe(tmp_path):
    code, out = lpq("ptq", "--scheme", "hif8", "--out", tmp_path / "o")
    assert code == 2 and "--scheme 'hif8': use one of hif4, mxfp4, nvfp4" in error_line(out)
    code, out = lpq("ptq", "--out", tmp_path / "o")
    assert code == 2 and "give a recipe: --config FILE, or --scheme" in error_line(out)
    code, out = lpq("ptq", "--scheme", "hif4", "--protect", "auto:x", "--out", tmp_path / "o")
    assert code == 2 and "--protect 'auto:x'" in error_line(out)
    code, out = lpq("ptq", "--scheme", "hif4", "--model", "tiny-llama", "--protect", "7", "--out", tmp_path / "o")
    assert code == 2 and "error: --protect: block 7 is out of range: tiny-llama has 2 blocks" in error_line(out)
    assert out.strip() == error_line(out)    # the resolved recipe is shown only once the checks pass
    code, out = lpq("ptq", "--scheme", "hif4", "--protect", "0,1,2", "--out", tmp_path / "o")
    assert code == 2 and error_line(out).startswith("error: --protect: 3 protected blocks exceed the challenge budget")
    code, out = lpq("ptq", "--scheme", "hif4", "--config", "r.yaml", "--out", tmp_path / "o")
    assert code == 2 and "--config r.yaml and --scheme hif4: give one recipe, not both" in error_line(out)
    code, out = lpq("recipes", "show", "w4a4_hif4")
    assert code == 0 and "algorithms:" in out


def test_an_empty_model_option_is_refused_not_replaced_by_the_recipe_model(tmp_path):
    code, out = lpq("ptq", "--scheme", "hif4", "--model", "", "--out", tmp_path / "o")
    assert code == 2 and error_line(out).startswith("error: --model: 'model': model.id is empty"), out
    code, out = lpq("eval", "--model", "tiny-llama", "--candidate", " ", "--out", tmp_path / "e")
    assert code == 2 and error_line(out) == "error: --candidate is empty: give a checkpoint folder (e.g. an lpq export)"
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_a_step_for_another_kind_of_model_is_refused_before_it_loads(tmp_path, monkeypatch):
    """norm_distill needs next-token logits: on a Wan pipeline it is refused from the model's files."""
    monkeypatch.setattr("lpq.models.hub.load_model", lambda cfg: pytest.fail("the model was loaded"))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    d = {"model": {"id": "tiny-wan21"}, "quant": {"format": "hif4"},
         "calibration": {"prompts": "prompts.txt", "num_prompts": 1},
         "algorithms": [{"name": "rtn"}, {"name": "norm_distill", "steps": 1, "sequences": 1, "seq_len": 8}],
         "protect": {"blocks": []}, "evaluation": None, "export": None}
    code, out = lpq("ptq", "--config", _write(tmp_path, d), "--out", tmp_path / "out")
    assert code == 2 and error_line(out) == ("error: norm_distill matches next-token distributions: it needs a "
                                             "causal LM, not a wan model"), out
    assert not (tmp_path / "out").exists()
