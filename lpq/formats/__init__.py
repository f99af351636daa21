"""Exact HiFloat8 / HiFloat4 / MXFP4 (and NVFP4) numerics: fake quantization and real bit codes.

The format table (FORMATS, get_format) loads without torch; the numerics (lpq.formats.api) load on
first use, so `lpq formats list` and recipe validation stay light.
"""
from typing import Any

from lpq.formats.spec import FORMATS, FormatSpec, get_format

_API = ("BIT_ORDER_VERSION", "SPEC_VERSION", "FakeQuantSTE", "Packed", "decode", "encode", "fake_quant",
        "fake_quant_ste")

__all__ = ["FORMATS", "FormatSpec", "get_format", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from lpq.formats import api

        return getattr(api, name)
    raise AttributeError(f"module 'lpq.formats' has no attribute {name!r}")
