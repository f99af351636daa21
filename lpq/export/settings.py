"""The `export:` section of a recipe. Light on purpose: the PTQ and QAT recipes embed it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Kinds in another runtime's layout -> the module that writes them (imported only when used).
RUNTIME_KINDS = {"compressed-tensors": "lpq.export.compressed_tensors", "gguf": "lpq.export.gguf"}
KINDS = ("packed", "fake", *RUNTIME_KINDS)


@dataclass
class ExportSettings:
    """Where and how to write the quantized checkpoint.

    `packed`: the real codes and scales (lpq.load_quantized reloads it bit-exactly);
    `fake`: dequantized weights in the model's dtype, loadable by stock transformers/diffusers;
    `compressed-tensors`: MXFP4/NVFP4 codes in the layout vLLM loads; `gguf`: MXFP4 weights for llama.cpp.
    """

    kind: Literal["packed", "fake", "compressed-tensors", "gguf"] = "packed"
    out: str | None = None           # output folder; the CLI's --out overrides it
    force: bool = False              # replace an existing `out`
    max_shard_gb: float = 5.0        # safetensors shard size limit

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"export kind {self.kind!r} is not allowed; use one of {', '.join(KINDS)}")
        if not self.max_shard_gb > 0:
            raise ValueError(f"max_shard_gb must be > 0, got {self.max_shard_gb}")
