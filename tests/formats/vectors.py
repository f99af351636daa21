"""Shared by the format tests: where the golden vectors are, how to read them, bit-exact comparison."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# formats.md §5: the vectors live in ../shared/vectors relative to the project root
VECTORS = Path(os.environ.get("LPQ_VECTORS", Path(__file__).resolve().parents[3] / "shared" / "vectors"))
INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
          torch.float16: torch.int16}


def vector_path(name: str) -> Path:
    path = VECTORS / name
    if not path.is_file():
        pytest.skip(f"golden vectors not found at {path} (set LPQ_VECTORS)")
    return path


def load_cases(name: str) -> dict[str, dict[str, np.ndarray]]:
    """A `<case>__<array>` npz file as {case: {array: values}}."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(vector_path(name)) as d:
        for key in d.files:
            if "__" in key:
                case, arr = key.split("__", 1)
                out.setdefault(case, {})[arr] = d[key]
    return out


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit for bit (signed zeros included), except that any NaN matches any NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), "NaN positions differ"
    ints = INT_OF[expected.dtype]
    a, e = actual.contiguous().view(ints)[~nan], expected.contiguous().view(ints)[~nan]
    bad = (a != e).nonzero()
    assert bad.numel() == 0, (f"{bad.numel()} of {e.numel()} differ, first: got {actual[~nan][bad[0]].item()!r} "
                              f"want {expected[~nan][bad[0]].item()!r}")
