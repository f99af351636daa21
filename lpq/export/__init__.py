"""Quantized checkpoints: packed (real codes and scales, bit-exact reload) or fake (dequantized weights).

Imports are lazy so that `ExportSettings` can be used in recipes without loading torch models.
"""
from __future__ import annotations

from typing import Any

from lpq.export.settings import ExportSettings

__all__ = ["CheckpointError", "ExportSettings", "SizeReport", "export_model", "load_quantized"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from lpq.export.writer import export_model
        return export_model
    if name == "load_quantized":
        from lpq.export.reader import load_quantized
        return load_quantized
    if name == "CheckpointError":
        from lpq.export.layout import CheckpointError
        return CheckpointError
    if name == "SizeReport":
        from lpq.export.size import SizeReport
        return SizeReport
    raise AttributeError(f"module 'lpq.export' has no attribute {name!r}")
