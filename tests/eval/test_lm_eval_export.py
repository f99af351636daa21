"""lm-eval on packed exports (model `lpq`) and lm-eval's own output layout written by lpq eval."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lpq.eval.paired as paired
from lpq.config import from_dict
from lpq.eval.harness import prepare_task, run_task
from lpq.eval.lm_eval_model import LpqLM
from lpq.eval.settings import EvalSettings
from lpq.export import export_model
from lpq.quant import QuantRecipe, quant_enabled, quantize_model
from tests.eval.conftest import fixture_tokenizer, perturbed

REPO = Path(__file__).resolve().parents[2]


def _settings(data_dir, **kw):
    return EvalSettings(data_dir=str(data_dir), tasks=["mmlu", "wikitext2"], limit=8, bootstrap=200, kl=False,
                        use_cache=False, **kw)


def test_lpq_eval_writes_lm_evals_results_and_samples(data_dir, tiny_lm, tmp_path):
    from lm_eval.utils import get_latest_filename, get_results_filenames, get_sample_results_filenames

    model, tok = tiny_lm
    res = paired.run_paired(model, perturbed(model), tok, _settings(data_dir), tmp_path / "out")
    for who in ("baseline", "quantized"):
        folder = tmp_path / "out" / "lm_eval" / who
        files = [str(p) for p in folder.iterdir()]
        results = get_results_filenames(files)
        assert len(results) == 2                      # one lm-eval run per task
        for name, metric in (("mmlu", "acc,none"), ("wikitext2", "word_perplexity,none")):
            task = f"lpq_{name}"                     # lpq's task YAMLs are named lpq_<task>
            [path] = [p for p in results if task in json.loads(Path(p).read_text())["results"]]
            data = json.loads(Path(path).read_text())
            assert data["results"][task][metric] == pytest.approx(res["tasks"][name][who])
            assert data["model_name"] == who and task in data["task_hashes"]
            samples = [p for p in get_sample_results_filenames(files) if f"samples_{task}_" in p]
            assert len(samples) == 1
            lines = Path(get_latest_filename(samples)).read_text().splitlines()
            assert len(lines) == res["tasks"][name]["n"]
            assert {"doc_id", "doc", "arguments", "resps", "filtered_resps"} <= json.loads(lines[0]).keys()


def _packed(tmp_path, model):
    recipe = from_dict({"format": "mxfp4", "attention": {"format": "hif8"}}, QuantRecipe)
    quantize_model(model, recipe)
    export_model(model, recipe, tmp_path / "packed", tokenizer=fixture_tokenizer())
    return tmp_path / "packed"


@pytest.mark.parametrize("keep_packed", [False, True])
def test_lm_eval_model_lpq_scores_the_export_with_its_quantizers(data_dir, tmp_path, keep_packed):
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from lpq.models.tiny import tiny_causal_lm

    assert get_model("lpq") is LpqLM and get_model("hf").__name__ == "HFLM"
    model = tiny_causal_lm("tiny-llama")
    folder = _packed(tmp_path, model)
    settings = _settings(data_dir)
    prepared = prepare_task("mmlu", settings)
    want = run_task(model, fixture_tokenizer(), prepared, settings).records
    out = simple_evaluate(model="lpq", model_args=f"pretrained={folder},batch_size=4,max_length=256,"
                                                f"keep_packed={keep_packed}",
                          tasks=[prepared.config], task_manager=TaskManager(include_defaults=False),
                          samples={prepared.config["task"]: prepared.indices}, bootstrap_iters=0, log_samples=True)
    got = sorted(out["samples"][prepared.config["task"]], key=lambda s: s["doc_id"])
    assert [[float(r[0]) for r in s["filtered_resps"]] for s in got] == [r["loglikelihoods"] for r in want]
    with torch.no_grad():
        ids = torch.randint(0, 1000, (1, 16))
        with quant_enabled(model, False):
            float_logits = model(ids).logits
        assert not torch.equal(float_logits, model(ids).logits)   # the quantizers are on in what was scored


def test_lm_eval_model_lpq_refuses_a_folder_that_is_not_a_packed_export(tmp_path):
    with pytest.raises(ValueError, match="not an lpq export"):
        LpqLM(pretrained=str(tmp_path))
    (tmp_path / "lpq_export.json").write_text(json.dumps({"kind": "gguf"}))
    with pytest.raises(ValueError, match="is a gguf export: evaluate it with llama.cpp"):
        LpqLM(pretrained=str(tmp_path))


@pytest.mark.slow
def test_lpq_lm_eval_command_line(data_dir, tmp_path):
    """`python -m lpq.eval.lm_eval_model` (the lpq-lm-eval script) is lm-eval's CLI with `--model lpq`."""
    from lpq.models.tiny import tiny_causal_lm

    folder = _packed(tmp_path, tiny_causal_lm("tiny-llama"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fixture_mc.yaml").write_text(
        "task: fixture_mc\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files: {{test: {data_dir / 'mmlu' / 'test.jsonl'}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lpq.eval.lm_eval_model", "run", "--model", "lpq", "--model_args",
           f"pretrained={folder}", "--tasks", "fixture_mc", "--include_path", str(tasks), "--limit", "4",
           "--batch_size", "4", "--output_path", str(tmp_path / "results"), "--log_samples"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [results] = list((tmp_path / "results").rglob("results_*.json"))
    assert 0 <= json.loads(results.read_text())["results"]["fixture_mc"]["acc,none"] <= 1
