"""The `export:` section of a recipe. Light on purpose: the PTQ and QAT recipes embed it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lpq.quant.recipe import QuantRecipe, Scaling
from lpq.schema import Choice, KeyedError


class ExportKind(Choice):
    PACKED = "packed"
    FAKE = "fake"
    COMPRESSED_TENSORS = "compressed-tensors"
    GGUF = "gguf"


# Kinds in another runtime's layout -> the module that writes them (imported only when used).
RUNTIME_KINDS = {"compressed-tensors": "lpq.export.compressed_tensors", "gguf": "lpq.export.gguf"}
KINDS = tuple(k.value for k in ExportKind)
# What each runtime kind stores and runs; its writer checks every weight and linear again.
MX_FORMATS = ("mxfp4", "mxfp4-rceil", "mxfp4-toolkit")
RUNTIME_WEIGHT_FORMATS = {"compressed-tensors": (*MX_FORMATS, "nvfp4"), "gguf": MX_FORMATS}
# Parts of a linear's online input transform (lpq.quant.InputTransform) the runtime applies: vLLM runs
# compressed-tensors' transform_config Hadamards, llama.cpp none; neither divides by a per-channel scale.
RUNTIME_ONLINE_PARTS = {"compressed-tensors": ("rotation",), "gguf": ()}
# What reads an export of each runtime kind (lpq itself reads packed exports, transformers fake ones).
RUNTIME_READERS = {"compressed-tensors": "vLLM (`vllm serve FOLDER`) or transformers with the compressed-tensors "
                                         "package",
                   "gguf": "llama.cpp (`llama-cli -m FOLDER/model.gguf`) or the gguf / llama-cpp-python packages"}


def check_runtime_quant(kind: str, quant: QuantRecipe) -> None:
    """What an export of runtime kind `kind` cannot hold, known from the quant recipe alone: refused as
    a recipe is read, before any model is loaded or quantized (KeyedError at the recipe's `export.kind`)."""
    formats = RUNTIME_WEIGHT_FORMATS.get(kind)
    if formats is None:
        return
    try:
        _check_runtime_quant(kind, formats, quant)
    except ValueError as e:
        raise KeyedError("export.kind", str(e)) from None


def _check_runtime_quant(kind: str, formats: tuple[str, ...], quant: QuantRecipe) -> None:
    if quant.weight is None or quant.weight.format not in formats:
        got = f"{quant.weight.format} weights" if quant.weight is not None else "no quantized weights"
        raise ValueError(f"export kind {kind} stores {', '.join(formats)} weights, the recipe has {got}; use kind "
                         "packed (lpq.load_quantized) or fake")
    if quant.weight.scaling != Scaling.NONE:
        raise ValueError(f"export kind {kind} cannot store per-tensor weight scaling "
                         f"({quant.weight.scaling.value}); use scaling: none for {quant.weight.format} weights")
    if kind == "gguf" and (quant.input is not None or quant.attention is not None):
        raise ValueError("kind gguf is weight-only: llama.cpp multiplies MXFP4 weights with activations in its own "
                         "precision (Q8_0 blocks on CPU), not lpq's input/attention quantizers; remove quant.input "
                         "and quant.attention")
    if quant.attention is not None:
        raise ValueError("attention quantization (quant.attention) has no compressed-tensors form that vLLM runs; "
                         "remove it, or use kind packed")
    spec = quant.input
    if spec is None:
        return
    if spec.format == "nvfp4":
        raise ValueError("nvfp4 input quantization cannot be exported to compressed-tensors: lpq computes each "
                         "activation's per-tensor scale at run time, compressed-tensors' NVFP4 needs a calibrated "
                         "static input_global_scale; drop quant.input (W4A16) or use mxfp4")
    if spec.format not in MX_FORMATS or quant.weight.format not in MX_FORMATS:
        raise ValueError(f"{spec.format} input quantization with {quant.weight.format} weights has no "
                         f"compressed-tensors scheme; it runs mxfp4 weights with dynamic mxfp4 activations, or "
                         "weight-only")
    if spec.scaling != Scaling.NONE or spec.axis != -1:
        raise ValueError("compressed-tensors' dynamic MXFP4 activations have only the block scale along the input "
                         "dim: use input scaling: none and axis: -1")


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
