"""Run lm-eval 0.4.13 on an in-memory model and keep one record per item.

Tasks are lpq's own YAMLs (lpq/eval/tasks/). Each is loaded by lm-eval's YAML loader (so
`!function` works), then pointed at the local data files, and passed to `simple_evaluate` as an
inline config. Items are a seeded subset, chosen once per task, so a baseline and a candidate see
exactly the same prompts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpq.eval.answers import extract_gsm8k, extract_math, gsm8k_target
from lpq.eval.settings import EvalSettings, resolve_data_dir

TASK_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    yaml: str
    kind: str                      # "multiple_choice", "generative" or "perplexity"
    metric: str                    # the score: "acc", "exact_match" or "word_perplexity"
    builder: str                   # datasets builder for local files: "json", "text" (GPQA: by suffix)
    local: dict[str, str]          # split -> file under the data dir
    how_to_get: str                # what to tell a user whose file is missing
    extract: Callable[[str], str] | None = None      # generative: response -> final answer
    reference: Callable[[str], str] | None = None    # generative: target field -> reference answer

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "perplexity"


TASKS: dict[str, TaskSpec] = {
    "mmlu": TaskSpec("lpq_mmlu.yaml", "multiple_choice", "acc", "json",
                     {"test": "mmlu/test.jsonl", "dev": "mmlu/dev.jsonl"},
                     'JSONL rows {"subject","question","choices":[4 strings],"answer":0-3}'),
    "gsm8k": TaskSpec("lpq_gsm8k.yaml", "generative", "exact_match", "json",
                      {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"},
                      'openai/grade-school-math JSONL rows {"question","answer": "... #### 42"}',
                      extract_gsm8k, gsm8k_target),
    "math500": TaskSpec("lpq_math500.yaml", "generative", "exact_match", "json",
                        {"test": "math500/test.jsonl"},
                        'JSONL rows {"problem","solution","answer",...} (HuggingFaceH4/MATH-500)',
                        extract_math, str),
    "gpqa": TaskSpec("lpq_gpqa.yaml", "multiple_choice", "acc", "csv",
                     {"train": "gpqa/gpqa_diamond.csv"},
                     'your own copy of GPQA (gated): CSV or JSONL with "Question", "Correct Answer", '
                     '"Incorrect Answer 1..3"; set eval.gpqa_file'),
    "wikitext2": TaskSpec("lpq_wikitext2.yaml", "perplexity", "word_perplexity", "text",
                          {"test": "wikitext2/test.txt"}, "WikiText-2 test as plain text lines"),
}


@dataclass
class TaskRun:
    """One model on one task: per-item records (in item order) and the task score."""

    task: str
    records: list[dict]
    score: float
    info: dict = field(default_factory=dict)


@dataclass
class PreparedTask:
    """A task resolved against the data: the lm-eval config and the items to run."""

    name: str
    spec: TaskSpec
    config: dict[str, Any]
    indices: list[int] | None      # None: every item
    n_items: int
    data_source: str
    fingerprint: str


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _local_files(name: str, spec: TaskSpec, settings: EvalSettings) -> tuple[dict[str, Path], str]:
    """split -> path of the local files, and the datasets builder to read them with."""
    if name == "gpqa":
        if settings.gpqa_file:
            path = Path(settings.gpqa_file).expanduser().resolve()
        else:
            data = resolve_data_dir(settings.data_dir)
            candidates = [data / "gpqa" / f for f in ("gpqa_diamond.csv", "gpqa_diamond.jsonl")] if data else []
            path = next((p for p in candidates if p.is_file()), candidates[0] if candidates else Path("gpqa"))
        return {"train": path}, "csv" if path.suffix == ".csv" else "json"
    data = resolve_data_dir(settings.data_dir)
    root = data if data is not None else Path("<no data dir>")
    return {split: root / rel for split, rel in spec.local.items()}, spec.builder


def _source_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def prepare_task(name: str, settings: EvalSettings) -> PreparedTask:
    """Resolve data files, load the task once to count its items, and pick the seeded subset."""
    try:
        from lm_eval import __version__ as lm_eval_version
    except ImportError:
        raise ModuleNotFoundError("lpq's text tasks need lm-eval 0.4.13: pip install 'lpq[eval]'") from None
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = TASKS[name]
    config = load_yaml(TASK_DIR / spec.yaml, resolve_func=True)
    files, builder = _local_files(name, spec, settings)
    missing = [p for p in files.values() if not p.is_file()]
    if not missing:
        config["dataset_path"] = builder
        config.pop("dataset_name", None)
        config["dataset_kwargs"] = {"data_files": {split: str(p) for split, p in files.items()}}
        data_source = ", ".join(str(p) for p in files.values())
        data_hash = _source_hash(list(files.values()))
        # Everything is on disk: make sure datasets never waits on a hub.
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    elif _hub_reachable():
        data_source = f"hub:{config['dataset_path']}/{config.get('dataset_name') or ''}"
        data_hash = data_source
    else:
        raise FileNotFoundError(
            f"task {name!r}: {missing[0]} not found and no hub is reachable. Put {spec.how_to_get} there, "
            f"or point --data-dir / $LPQ_DATA_DIR / eval.data_dir at a folder with "
            f"{', '.join(spec.local.values())}.")
    config["num_fewshot"] = settings.num_fewshot if settings.num_fewshot is not None else config.get("num_fewshot", 0)
    if settings.max_gen_toks is not None and "generation_kwargs" in config:
        config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": settings.max_gen_toks}

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    task = TaskManager(include_defaults=False).load([config])["tasks"][config["task"]]
    total = len(task.eval_docs)
    if total == 0:
        raise ValueError(f"task {name!r}: no items in {data_source}")
    limit = settings.task_limits.get(name, settings.limit)
    indices = None
    if limit is not None and limit < total:
        indices = sorted(random.Random(settings.seed).sample(range(total), limit))
    fp = {
        "task": name, "yaml": (TASK_DIR / spec.yaml).read_text(), "data": data_hash, "indices": indices,
        "num_fewshot": config["num_fewshot"], "generation_kwargs": config.get("generation_kwargs"),
        "helpers": _source_hash([Path(__file__).with_name("answers.py"), TASK_DIR / "utils.py"]),
        "lm_eval": lm_eval_version, "max_length": settings.max_length,
    }
    fingerprint = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return PreparedTask(name, spec, config, indices, len(indices) if indices else total, data_source, fingerprint)


def make_lm(model, tokenizer, settings: EvalSettings, batch_size: int):
    """lm-eval's HFLM around an in-memory model (batched log-likelihoods, logits shared across choices)."""
    from lm_eval.models.huggingface import HFLM

    from lpq.eval.lm_eval_model import hidden_quantization_config

    kwargs: dict[str, Any] = {}
    if settings.enable_thinking is not None:
        kwargs["enable_thinking"] = settings.enable_thinking
        if settings.enable_thinking:
            kwargs["think_end_token"] = settings.think_end_token
    with hidden_quantization_config(model):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=settings.max_length,
                    **kwargs)


def run_task(model, tokenizer, prepared: PreparedTask, settings: EvalSettings,
             lm_eval_dir: Path | None = None) -> TaskRun:
    """Evaluate one model on one prepared task; records come back in item order. `lm_eval_dir`: also
    write lm-eval's own results_*.json and samples_*.jsonl there (lpq.eval.lm_eval_layout)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lpq.eval import lm_eval_layout

    spec = prepared.spec
    batch = settings.window_batch_size if spec.kind == "perplexity" else settings.batch_size
    lm = make_lm(model, tokenizer, settings, batch)
    task_name = prepared.config["task"]
    tracker = lm_eval_layout.tracker(lm_eval_dir) if lm_eval_dir is not None else None
    with torch.no_grad():
        out = simple_evaluate(
            model=lm, tasks=[prepared.config], task_manager=TaskManager(include_defaults=False),
            samples={task_name: prepared.indices} if prepared.indices else None,
            bootstrap_iters=0, log_samples=True, apply_chat_template=settings.chat_template,
            fewshot_as_multiturn=settings.chat_template, evaluation_tracker=tracker)
    if lm_eval_dir is not None:
        lm_eval_layout.save(tracker, lm_eval_dir, out)
    samples = sorted(out["samples"][task_name], key=lambda s: s["doc_id"])
    records = [_record(spec, s) for s in samples]
    info = {"lm_eval_score": out["results"][task_name].get(f"{spec.metric},none")}
    return TaskRun(prepared.name, records, task_score(spec, records), info)


def _record(spec: TaskSpec, sample: dict) -> dict:
    rec: dict[str, Any] = {"doc_id": sample["doc_id"], "prompt_hash": sample["prompt_hash"],
                           "doc_hash": sample["doc_hash"]}
    if spec.kind == "multiple_choice":
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        rec.update(target=sample["target"], loglikelihoods=lls, prediction=max(range(len(lls)), key=lls.__getitem__),
                   correct=int(sample["acc"]))
    elif spec.kind == "generative":
        response = sample["filtered_resps"][0]
        rec.update(target=spec.reference(sample["target"]), response=response, prediction=spec.extract(response),
                   correct=int(sample["exact_match"]))
    else:
        ll, words = sample["word_perplexity"]
        rec.update(loglikelihood=float(ll), words=int(words), bytes=int(sample["byte_perplexity"][1]))
    return rec


def task_score(spec: TaskSpec, records: list[dict]) -> float:
    """Accuracy (mean correctness) or word perplexity (exp of -sum loglik / sum words)."""
    if spec.kind == "perplexity":
        return math.exp(-sum(r["loglikelihood"] for r in records) / sum(r["words"] for r in records))
    return sum(r["correct"] for r in records) / len(records)
