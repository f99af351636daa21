"""Names and version numbers of an export folder (described in docs/export.md), and their checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lpq.formats.api import BIT_ORDER_VERSION, SPEC_VERSION
from lpq.outputs import RECIPE_COPY

EXPORT_VERSION = 2                 # layout of the folder, index and tensor names; bump on any change
# 2 added input transforms (index "input_transforms"); a version-1 reader would load a model with
# rotated weights but no online rotation, so it must refuse version 2. Version 1 is still read.
READABLE_EXPORT_VERSIONS = (1, 2)
MANIFEST = "lpq_export.json"       # root: kind, versions, recipe, networks, size report
RECIPE_FILE = RECIPE_COPY
README = "README.md"
INDEX = "lpq_index.json"           # per packed network: files, checksums, tensor -> file, quantized weights
PACKED_STEM = "lpq_packed"         # not model.safetensors: stock loaders must not mistake codes for weights
QUANT_METHOD = "lpq"

# Suffixes appended to a quantized weight's state-dict key in packed files.
CODES, SCALES, TENSOR_SCALE, PRESCALE = ".codes", ".scales", ".tensor_scale", ".prescale"


class CheckpointError(RuntimeError):
    """An export folder that cannot be loaded: damaged, incomplete, or written by an unknown version."""


def versions() -> dict[str, int]:
    return {"lpq_export_version": EXPORT_VERSION, "format_spec_version": SPEC_VERSION,
            "bit_order_version": BIT_ORDER_VERSION}


def check_versions(meta: dict[str, Any], where: Path | str) -> None:
    """Refuse metadata written with versions this lpq does not read."""
    readable = {**{k: (v,) for k, v in versions().items()}, "lpq_export_version": READABLE_EXPORT_VERSIONS}
    for key, known in readable.items():
        if key not in meta:
            raise CheckpointError(f"{where}: no {key!r}; this is not an lpq packed export, or it is damaged")
        if meta[key] not in known:
            which = f"version {known[0]}" if len(known) == 1 else f"versions {', '.join(map(str, known))}"
            raise CheckpointError(
                f"{where}: written with {key.replace('_', ' ')} {meta[key]!r}, but this lpq reads only {which}; "
                f"load it with the lpq release that wrote it, or export the model again")
