"""Baseline runs cached on disk, keyed by what determines them: model, task, lm-eval, template.

A quantization sweep compares many candidates against one baseline; the baseline's per-item
records are computed once and reused while the fingerprint stays the same.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lpq.eval.harness import TaskRun
from lpq.eval.settings import EvalSettings


def model_fingerprint(model) -> str:
    """Hash of the model class, its config and every tensor of its state dict (bytes, not values)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def template_fingerprint(tokenizer, settings: EvalSettings) -> str:
    """The tokenizer (vocabulary, template) and the chat/thinking settings that shape every prompt."""
    vocab = sorted(tokenizer.get_vocab().items())
    parts = {"tokenizer": type(tokenizer).__name__, "vocab": hashlib.sha256(json.dumps(vocab).encode()).hexdigest(),
             "chat_template": settings.chat_template, "enable_thinking": settings.enable_thinking,
             "think_end_token": settings.think_end_token,
             "template": getattr(tokenizer, "chat_template", None) if settings.chat_template else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(settings: EvalSettings) -> Path:
    if settings.cache_dir:
        return Path(settings.cache_dir).expanduser()
    return Path(os.environ.get("LPQ_CACHE", Path.home() / ".cache" / "lpq")) / "eval"


def _paths(settings: EvalSettings, key: str) -> tuple[Path, Path]:
    root = cache_dir(settings)
    return root / f"{key}.jsonl", root / f"{key}.json"


def load_run(settings: EvalSettings, key: str) -> TaskRun | None:
    records_path, meta_path = _paths(settings, key)
    if not (records_path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line]
    if len(records) != meta["n"]:
        return None                                        # a partial write: recompute
    return TaskRun(meta["task"], records, meta["score"], meta.get("info", {}))


def save_run(settings: EvalSettings, key: str, run: TaskRun) -> None:
    records_path, meta_path = _paths(settings, key)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records_path.write_text("".join(json.dumps(r) + "\n" for r in run.records))
    meta_path.write_text(json.dumps({"task": run.task, "score": run.score, "info": run.info, "n": len(run.records)}))
