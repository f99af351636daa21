"""Build and cache the C++ kernels in lpq/csrc, one extension per format family."""
from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=off", "-std=c++17"]
LDFLAGS = ["-fopenmp"]

_loaded: dict[str, ModuleType | None] = {}
_why: dict[str, str] = {}


def cache_dir() -> Path:
    root = Path(os.environ.get("LPQ_CACHE", Path.home() / ".cache" / "lpq"))
    return root / "kernels"


def _cpu_tag() -> str:
    # -march=native code must not be reused on a CPU with other instruction sets.
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def load_kernel(family: str) -> ModuleType | None:
    """The compiled extension for `family`, or None (with one warning) if it cannot be built."""
    if family in _loaded:
        return _loaded[family]
    src = CSRC / f"{family}.cpp"
    ext = None
    if not src.is_file():
        _why[family] = f"no kernel source {src}"
    else:
        # Headers are part of every kernel's source: a change to one must rebuild them all.
        parts = [src.read_bytes()] + [h.read_bytes() for h in sorted(CSRC.glob("*.h"))]
        digest = hashlib.sha1(b"".join(parts) + " ".join(CFLAGS).encode()).hexdigest()[:10]
        build = cache_dir() / f"torch{torch.__version__}-{_cpu_tag()}" / f"{family}-{digest}"
        build.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.cpp_extension import load

            ext = load(name=f"lpq_{family}_{digest}", sources=[str(src)], extra_cflags=CFLAGS,
                       extra_ldflags=LDFLAGS, build_directory=str(build), verbose=False)
        except Exception as e:  # a compiler or toolchain problem: say so once, fall back
            _why[family] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    if ext is None:
        warnings.warn(f"lpq: C++ kernel for '{family}' unavailable ({_why[family]}); "
                      "using the plain-PyTorch reference (slower). Set LPQ_BACKEND=ref to silence.",
                      RuntimeWarning, stacklevel=3)
    _loaded[family] = ext
    return ext


def why_unavailable(family: str) -> str | None:
    return _why.get(family)
