"""lm-eval's own output files for an lpq evaluation run, so tools that read lm-eval's output read lpq's.

lm-eval's CLI writes `<output_path>/<model>/results_<time>.json` (scores, task configs, versions,
sample hashes) and `samples_<task>_<time>.jsonl` (one line per item: doc, arguments, responses,
metrics) through its EvaluationTracker. lpq runs lm-eval through `simple_evaluate` with the same
tracker and saves the same two files, for each task and model (`baseline`, `quantized`).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def tracker(folder: Path) -> Any:
    """An lm-eval EvaluationTracker writing into `folder` (its last component is the model's name)."""
    from lm_eval.loggers import EvaluationTracker

    return EvaluationTracker(output_path=str(folder.parent))


def save(evaluation_tracker: Any, folder: Path, output: dict) -> list[Path]:
    """Write `simple_evaluate`'s output (run with `evaluation_tracker`) as lm-eval's results and samples files
    in `folder`. Returns the files written; raises if lm-eval could not write them (it only logs)."""
    general = evaluation_tracker.general_config_tracker
    general.model_name = general.model_name_sanitized = folder.name
    before = set(folder.glob("*")) if folder.is_dir() else set()
    results = {k: v for k, v in output.items() if k != "samples"}
    samples = copy.deepcopy(output["samples"])     # lm-eval rewrites the sample dicts it saves
    evaluation_tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        evaluation_tracker.save_results_samples(task_name=task, samples=samples[task])
    written = sorted(set(folder.glob("*")) - before)
    if not any(p.name.startswith("results_") for p in written):
        raise RuntimeError(f"lm-eval did not write its results file into {folder} (see its log above)")
    return written
