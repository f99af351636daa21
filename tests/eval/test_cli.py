"""`lpq eval` end to end on built-in tiny models: on-the-fly quantization, a second checkpoint, Wan2.2."""
import json

import pytest
from typer.testing import CliRunner

from lpq.cli import app

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, ["eval", *map(str, args)])
    return result, result.output + (repr(result.exception) if result.exception else "")


@pytest.mark.slow   # quantize_model may build the C++ format kernels first (~20 s once)
def test_quantize_on_the_fly_from_a_recipe(data_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  id: tiny-llama\nquant:\n  format: hif4\n"
                      "eval:\n  tasks: [mmlu, wikitext2]\n  kl_windows: 2\n  kl_seq_len: 64\n  bootstrap: 200\n")
    result, out = _run(["--config", recipe, "--limit", 4, "--data-dir", data_dir, "--no-cache", "--out", tmp_path / "o"])
    assert result.exit_code == 0, out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["tasks"]["mmlu"]["n"] == 4 and res["recipe"]["quant"]["format"] == "hif4"
    assert res["distribution_shift"]["kl_div"] > 0               # the quantized copy really differs
    assert "mean |relative accuracy loss|" in out


def test_second_checkpoint_and_missing_candidate(data_dir, tmp_path):
    result, out = _run(["--model", "tiny-llama", "--candidate", "tiny-llama", "--tasks", "mmlu", "--limit", 4,
                        "--data-dir", data_dir, "--no-kl", "--no-cache", "--out", tmp_path / "o"])
    assert result.exit_code == 0, out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["tasks"]["mmlu"]["rel_loss_pct"] in (0.0, None)
    result, out = _run(["--model", "tiny-llama", "--out", tmp_path / "x"])
    assert result.exit_code == 2 and "give exactly one candidate" in out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model, candidate, message", [
    ("tiny-llama", "{tmp}", "has no config.json (nor model_index.json)"),
    ("tiny-llama", "{tmp}/gone", "model folder {tmp}/gone does not exist"),
    ("tiny-lama", "tiny-llama", "unknown built-in model 'tiny-lama'; did you mean tiny-llama?"),
    # the messages name the option the candidate came from, not the recipe's model.id
    ("tiny-llama", "{tmp}/w.safetensors", "--candidate {tmp}/w.safetensors is a file; give the model's folder"),
    ("tiny-llama", "org/no-such-model", "give DIR as --candidate"),
])
def test_models_that_cannot_load_are_named_before_the_output_folder_is_made(tmp_path, model, candidate, message,
                                                                            monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "w.safetensors").write_bytes(b"")
    tmp = str(tmp_path / "in")
    result, out = _run(["--model", model, "--candidate", candidate.format(tmp=tmp), "--out", tmp_path / "o"])
    assert result.exit_code == 2 and message.format(tmp=tmp) in out, out
    assert not (tmp_path / "o").exists()


def test_a_candidate_of_another_model_is_refused(tmp_path):
    """Scored with the baseline's tokenizer position by position, another model's numbers mean nothing."""
    from lpq.export import export_model
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import QuantRecipe, quantize_model

    model = load_model(ModelConfig(id="tiny-llama")).model
    recipe = QuantRecipe(format="hif8")
    quantize_model(model, recipe)
    export_model(model, recipe, tmp_path / "llama-hif8", kind="packed")
    result, out = _run(["--model", "tiny-qwen3", "--candidate", tmp_path / "llama-hif8", "--tasks", "wikitext2",
                        "--limit", 2, "--out", tmp_path / "o"])
    assert result.exit_code == 2 and f"--candidate {tmp_path / 'llama-hif8'} is not tiny-qwen3 quantized: its " \
        "model_type is 'llama', the baseline's 'qwen3'" in out, out
    result, out = _run(["--model", "tiny-llama", "--candidate", "tiny-llama", "--tasks", "video", "--out",
                        tmp_path / "v"])
    assert result.exit_code == 2 and "task 'video' needs a Wan pipeline; tiny-llama is a causal LM" in out, out
    assert not (tmp_path / "v").exists()


def test_wan22_video_from_a_recipe(data_dir, tmp_path):
    recipe = tmp_path / "w.yaml"
    recipe.write_text("model:\n  id: tiny-wan22\nquant:\n  format: hif8\neval:\n  bootstrap: 200\n")
    result, out = _run(["--config", recipe, "--data-dir", data_dir, "--out", tmp_path / "v"])
    assert result.exit_code == 0, out
    res = json.loads((tmp_path / "v" / "results.json").read_text())
    assert res["tasks"]["video_flicker"]["n"] == 2 and res["video"]["latent_mse"] > 0


@pytest.mark.slow   # quantize + export + reload
def test_packed_lpq_export_as_candidate(data_dir, tmp_path):
    from lpq.export import export_model
    from lpq.models.tiny import build_tiny
    from lpq.quant import QuantRecipe, quantize_model

    tiny = build_tiny("tiny-llama")
    recipe = QuantRecipe(format="hif8")
    export_model(quantize_model(tiny.model, recipe), recipe, tmp_path / "export", tokenizer=tiny.tokenizer)
    args = ["--model", "tiny-llama", "--tasks", "wikitext2", "--data-dir", data_dir, "--no-cache",
            "--kl", "--out", tmp_path / "o"]
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("eval:\n  kl_windows: 2\n  kl_seq_len: 64\n  bootstrap: 200\n")
    result, out = _run(["--config", recipe_file, "--candidate", tmp_path / "export", *args])
    assert result.exit_code == 0, out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["recipe"]["candidate"] == str(tmp_path / "export")
    assert res["distribution_shift"]["kl_div"] > 0              # the packed HiF8 weights differ from float


@pytest.mark.parametrize("args, message", [
    (["--tasks", "wikitext2,nope"], "error: --tasks: 'eval.tasks[1]': 'nope' is not allowed; use one of"),
    (["--tasks", "wikitext2", "--limit", -1], "error: --limit: 'eval': limit must be >= 1"),
    (["--tasks", "", "--no-kl"], "error: --tasks: 'eval': nothing to evaluate: no task and kl off; name tasks"),
    (["--tasks", "wikitext2,mmlu,wikitext2"], "error: --tasks: 'eval': tasks lists 'wikitext2' twice"),
    (["--tasks", "wikitext2", "--vbench", "python3"], "error: --vbench: 'eval': vbench_python scores the generated "
                                                      "videos: it needs the 'video' task (tasks: wikitext2)"),
    (["--tasks", "wikitext2", "--data-dir", "{tmp}/none"],
     "error: data folder {tmp}/none (--data-dir, eval.data_dir or $LPQ_DATA_DIR) does not exist"),
    (["--tasks", "video", "--vbench", "{tmp}/none/python"],
     "error: --vbench / eval.video.vbench_python: {tmp}/none/python is not an executable file"),
])
def test_bad_option_values_name_the_option_before_any_folder(tmp_path, args, message):
    args = [str(a).format(tmp=tmp_path) for a in args]
    result, out = _run(["--model", "tiny-llama", "--candidate", "tiny-llama", *args, "--out", tmp_path / "o"])
    assert result.exit_code == 2 and message.format(tmp=tmp_path) in out, out
    assert not (tmp_path / "o").exists()
    # The same with a recipe file: the option, not the file's line, gave the bad value.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  id: tiny-llama\neval:\n  tasks: [wikitext2]\n")
    result, out = _run(["--config", recipe, "--candidate", "tiny-llama", "--tasks", "nope", "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "error: --tasks: 'eval.tasks[0]': 'nope' is not allowed" in out, out
