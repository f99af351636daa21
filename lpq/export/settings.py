"""The `export:` section of a recipe. Light on purpose: the PTQ and QAT recipes embed it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lpq.schema import Choice, KeyedError


class ExportKind(Choice):
    PACKED = "packed"
    FAKE = "fake"
    COMPRESSED_TENSORS = "compressed-tensors"
    GGUF = "gguf"


# Kinds in another runtime's layout -> the module that writes them (imported only when used).
RUNTIME_KINDS = {"compressed-tensors": "lpq.export.compressed_tensors", "gguf": "lpq.export.gguf"}
KINDS = tuple(k.value for k in ExportKind)
# What reads an export of each runtime kind (lpq itself reads packed exports, transformers fake ones).
RUNTIME_READERS = {"compressed-tensors": "vLLM (`vllm serve FOLDER`) or transformers with the compressed-tensors "
                                         "package",
                   "gguf": "llama.cpp (`llama-cli -m FOLDER/model.gguf`) or the gguf / llama-cpp-python packages"}


def runtime_export_refusal(folder: str | Path, kind: str) -> str:
    """The one line lpq says when asked to load an export written for another runtime."""
    return (f"{folder} is a {kind} export, for another runtime: load it with "
            f"{RUNTIME_READERS[kind].replace('FOLDER', str(folder))}; lpq loads packed exports "
            f"(lpq export --kind packed)")


def export_kind(folder: str | Path) -> str | None:
    """The kind of the lpq export at `folder` (its manifest, lpq.export.layout.MANIFEST); None for any
    other folder and for a manifest that cannot be read (the loaders name what is wrong with it)."""
    try:
        manifest = json.loads((Path(folder) / "lpq_export.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("kind") if isinstance(manifest, dict) else None


def refuse_runtime_export(folder: str | Path) -> None:
    """Before a command loads `folder` as a model: refuse an export written for another runtime."""
    kind = export_kind(folder)
    if kind in RUNTIME_KINDS:
        raise ValueError(runtime_export_refusal(folder, kind))


@dataclass
class ExportSettings:
    """Where and how to write the quantized checkpoint.

    `packed`: the real codes and scales (lpq.load_quantized reloads it bit-exactly);
    `fake`: dequantized weights in the model's dtype, loadable by stock transformers/diffusers;
    `compressed-tensors`: MXFP4/NVFP4 codes in the layout vLLM loads; `gguf`: MXFP4 weights for llama.cpp.
    """

    kind: ExportKind = ExportKind.PACKED
    out: str | None = None           # output folder; the CLI's --out overrides it
    force: bool = False              # replace an existing `out`
    max_shard_gb: float = 5.0        # safetensors shard size limit

    def __post_init__(self) -> None:
        self.kind = ExportKind.parse(self.kind, "export kind")
        if not self.max_shard_gb > 0:
            raise KeyedError("max_shard_gb", f"max_shard_gb must be > 0, got {self.max_shard_gb}")
