"""Handing memory that the process has freed back to the operating system (glibc)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the whole free pages of the C heap to the OS (glibc's malloc_trim(0)).

    glibc keeps memory freed by medium allocations (64 KiB-4 MiB: activations, logit slices) in
    fragmented heaps and trims only their tops; over a training loop that is about 1 GB of RSS held
    for nothing on SmolLM2 (docs/ptq_results.md round 8). Called between steps it costs a few ms.
    False where the C library has no malloc_trim (nothing is done)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
