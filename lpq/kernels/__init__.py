"""GPU kernels (Triton) for lpq's numerics. lpq.formats.api picks them for CUDA tensors.

Without a GPU the same kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set
before triton is first imported); the tests use that. Triton is optional: `available()` says
whether the kernels can run on a device, and why not.
"""
from __future__ import annotations

import os

import torch

_why: str | None = None
try:
    import triton  # noqa: F401
except ImportError as e:   # the CPU install has no use for it
    _why = f"triton is not installed ({e})"


def interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of `device`."""
    return why_unavailable(device) is None


def why_unavailable(device: torch.device | str) -> str | None:
    if _why is not None:
        return _why
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and interpreted()):
        return None
    return f"no Triton kernels for {kind} tensors" + ("" if kind != "cpu" else " (set TRITON_INTERPRET=1 to interpret them)")
