"""Evaluation: lm-eval tasks on in-memory models, paired statistics, distribution shift, video metrics.

Imports are lazy so that the recipe settings (`lpq.eval.settings`) load without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"PreparedTask": "harness", "TaskRun": "harness", "prepare_task": "harness", "run_task": "harness",
          "run_paired": "paired", "EvalSettings": "settings", "VideoSettings": "settings",
          "DomainEvalSettings": "settings", "distribution_shift": "shift", "perplexity": "shift",
          "run_paired_video": "video"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lpq.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lpq.eval.{_WHERE[name]}"), name)
