"""Baseline vs candidate on the same items: per-item JSONL, paired statistics, results.json and report.

`run_paired` takes two ready models and does not care how the candidate was made (on-the-fly
quantization, a loaded export, a perturbed copy in a test).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from lpq.eval import cache
from lpq.eval.harness import TASKS, PreparedTask, TaskRun, prepare_task, run_task
from lpq.eval.settings import LM_TASKS, EvalSettings, kl_text_path
from lpq.eval.shift import distribution_shift
from lpq.eval.stats import agreement, mean_abs_pct_loss, paired_compare

LM_EVAL_DIR = "lm_eval"      # lm-eval's own output layout, per model: <out>/lm_eval/{baseline,quantized}/


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _log(msg: str) -> None:
    print(f"[lpq eval] {msg}", flush=True)


def baseline_run(model, tokenizer, prepared: PreparedTask, settings: EvalSettings, model_fp: str,
                 lm_eval_dir: Path | None = None) -> TaskRun:
    """The baseline's records for a task, from the cache when the fingerprint matches (then without lm-eval's
    output files in `lm_eval_dir`: those are written by a run)."""
    key = hashlib.sha256(f"{model_fp}|{prepared.fingerprint}|{cache.template_fingerprint(tokenizer, settings)}"
                         .encode()).hexdigest()[:24]
    if settings.use_cache:
        hit = cache.load_run(settings, key)
        if hit is not None:
            _log(f"{prepared.name}: baseline from cache ({cache.cache_dir(settings) / key}.jsonl)")
            return hit
    run = run_task(model, tokenizer, prepared, settings, lm_eval_dir)
    if settings.use_cache:
        cache.save_run(settings, key, run)
    return run


def compare_task(prepared: PreparedTask, base: TaskRun, cand: TaskRun, settings: EvalSettings) -> dict:
    """tasks.<name> of results.json for one task."""
    if [r["prompt_hash"] for r in base.records] != [r["prompt_hash"] for r in cand.records]:
        raise RuntimeError(f"{prepared.name}: baseline and candidate saw different prompts; "
                           f"the cached baseline may be stale (delete it or set eval.use_cache: false)")
    spec = prepared.spec
    if spec.kind == "perplexity":
        stats = paired_compare([r["loglikelihood"] for r in base.records], [r["loglikelihood"] for r in cand.records],
                               [r["words"] for r in base.records], perplexity=True, iters=settings.bootstrap,
                               seed=settings.seed)
        agree = None
    else:
        stats = paired_compare([r["correct"] for r in base.records], [r["correct"] for r in cand.records],
                               iters=settings.bootstrap, seed=settings.seed)
        agree = agreement([r["prediction"] for r in base.records], [r["prediction"] for r in cand.records])
    return {**stats, "agreement": agree, "metric": spec.metric, "kind": spec.kind,
            "higher_is_better": spec.higher_is_better, "data": prepared.data_source,
            "subset": "all" if prepared.indices is None else f"{prepared.n_items} items, seed {settings.seed}"}


def run_paired(baseline, candidate, tokenizer, settings: EvalSettings, out_dir: str | Path,
               model_name: str = "model", recipe: dict | None = None) -> dict:
    """Evaluate both models on `settings.tasks`, write the per-item JSONL and the report, return results.json."""
    from lpq.eval.report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in settings.tasks if t in LM_TASKS]
    if not tasks and not settings.kl:
        raise ValueError(f"no language-model task in {settings.tasks}; allowed: {', '.join(LM_TASKS)}")
    t0 = time.time()
    model_fp = cache.model_fingerprint(baseline)
    results: dict = {"model": model_name, "tasks": {}, "timing_s": {}}
    for i, name in enumerate(tasks, 1):
        prepared = prepare_task(name, settings)
        _log(f"task {i}/{len(tasks)} {name}: {prepared.n_items} items from {prepared.data_source}")
        t = time.time()
        base = baseline_run(baseline, tokenizer, prepared, settings, model_fp, out / LM_EVAL_DIR / "baseline")
        tb = time.time() - t
        _log(f"{name}: baseline {TASKS[name].metric} = {base.score:.4f} ({tb:.1f} s); running candidate")
        t = time.time()
        cand = run_task(candidate, tokenizer, prepared, settings, out / LM_EVAL_DIR / "quantized")
        tc = time.time() - t
        _write_jsonl(out / "items" / f"{name}.baseline.jsonl", base.records)
        _write_jsonl(out / "items" / f"{name}.quantized.jsonl", cand.records)
        results["tasks"][name] = compare_task(prepared, base, cand, settings)
        results["timing_s"][name] = {"baseline": round(tb, 2), "quantized": round(tc, 2)}
        _log(f"{name}: quantized {TASKS[name].metric} = {cand.score:.4f} ({tc:.1f} s)")
    accuracy_tasks = [n for n in tasks if TASKS[n].kind != "perplexity"]
    results["mean_abs_pct_loss"] = mean_abs_pct_loss([results["tasks"][n]["rel_loss_pct"] for n in accuracy_tasks])
    results["mean_abs_pct_loss_tasks"] = accuracy_tasks
    if settings.kl:
        path = kl_text_path(settings)
        _log(f"distribution shift on {path} ({settings.kl_windows} windows x {settings.kl_seq_len} tokens)")
        t = time.time()
        shift = distribution_shift(baseline, candidate, tokenizer, path.read_text(), settings.kl_windows,
                                   settings.kl_seq_len, settings.window_batch_size)
        results["distribution_shift"] = {**shift, "text": str(path)}
        results["timing_s"]["distribution_shift"] = round(time.time() - t, 2)
    results["timing_s"]["total"] = round(time.time() - t0, 2)
    results.update(_provenance(settings, tokenizer, recipe))
    write_report(results, out)
    return results


def _provenance(settings: EvalSettings, tokenizer, recipe: dict | None) -> dict:
    import platform

    import torch
    import transformers
    from lm_eval import __version__ as lm_eval_version

    from lpq.config import to_dict

    return {"chat_template": settings.chat_template, "enable_thinking": settings.enable_thinking,
            "settings": to_dict(settings), "recipe": recipe,
            "versions": {"lm_eval": lm_eval_version, "transformers": transformers.__version__,
                         "torch": torch.__version__, "python": platform.python_version()},
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__)}
