"""Export kind `compressed-tensors`: the checkpoint layout vLLM (and transformers) load.

lpq's MXFP4 and NVFP4 packing is already compressed-tensors' (E2M1 nibbles, element 2i in the low
nibble, one scale per block along the input dim), so the codes and block scales are written as they
are, never re-quantized:

| lpq weight format | compressed-tensors format | tensors per linear |
|---|---|---|
| mxfp4, mxfp4-rceil, mxfp4-toolkit | `mxfp4-pack-quantized` | `weight_packed` uint8 (out, in/2), `weight_scale` uint8 E8M0 (out, in/32) |
| nvfp4 | `nvfp4-pack-quantized` | the same with `weight_scale` float8_e4m3fn (out, in/16) and `weight_global_scale` float32 (1,) |

(The three MXFP4 variants differ only in how lpq chose the scales; the stored weights decode the
same way.) NVFP4's per-tensor scale s multiplies in lpq; compressed-tensors stores its inverse
(`weight_global_scale` = 1/s, dequantization divides by it), so the stored value is fp32(1/s).

Activations: an MXFP4 input quantizer becomes compressed-tensors' dynamic MXFP4 activation scheme
(W4A4); the runtime picks its own block exponent (see docs/export.md for the rule and the measured
difference). A recipe without input quantization is W4A16. Refused, because the runtime would
compute something else: NVFP4 activations (lpq derives their per-tensor scale from each tensor at
run time; compressed-tensors' NVFP4 needs a calibrated static `input_global_scale`), activation
formats other than the weights' family, per-tensor activation scaling, attention quantization,
online per-channel input scales, and Hadamard blocks that do not divide the input dim.
A block Hadamard on a linear's input is `transform_config`'s deterministic (Sylvester) `hadamard`
with `head_dim` = the block, applied online to the input: the same matrix as lpq's FWHT.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpq.export.bits import LinearBits, dense_tensors, linear_bits, require_causal_lm, unquantized_linears
from lpq.export.packing import input_transforms, quantized_weights
from lpq.export.settings import RUNTIME_WEIGHT_FORMATS, check_runtime_quant
from lpq.export.tensor_io import write_hf_index, write_shards
from lpq.quant.recipe import QuantRecipe

KIND = "compressed-tensors"
FORMATS = RUNTIME_WEIGHT_FORMATS[KIND]
WHAT = "a compressed-tensors checkpoint"
STEM = "model"
README = ("compressed-tensors checkpoint (`quantization_config.quant_method: compressed-tensors`): the quantized "
          "weights hold lpq's own codes and block scales in compressed-tensors' pack-quantized layout. Serve it "
          "with vLLM (`vllm serve THIS_FOLDER`), or load it with `transformers.AutoModelForCausalLM."
          "from_pretrained(\"THIS_FOLDER\")` (needs the `compressed-tensors` package). Activation quantization, "
          "if any, is the runtime's dynamic MXFP4 rule, which picks some block scales differently from lpq "
          "(docs/export.md).")


def _mx_args(dynamic: bool) -> dict[str, Any]:
    return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
            "dynamic": dynamic, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}


def _nv_weight_args() -> dict[str, Any]:
    return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
            "dynamic": False, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}


def _transform_config(net: nn.Module) -> dict[str, Any] | None:
    """transform_config for the online block Hadamards; refuses what it cannot express."""
    by_block: dict[int, list[str]] = {}
    for name, entry in input_transforms(net).items():
        if entry["input_scale"] is not None:
            raise ValueError(f"{name}: an online per-channel input scale (SmoothQuant where no norm or linear "
                             f"could absorb it, or norm_distill's input_scales); compressed-tensors has no online "
                             f"per-channel division, so this model cannot be exported with kind compressed-tensors")
        block = entry["hadamard_block"]
        in_features = net.get_submodule(name).in_features
        if in_features % block:
            raise ValueError(f"{name}: input dim {in_features} is not a multiple of the Hadamard block {block} (lpq "
                             f"ends the row with smaller blocks); compressed-tensors' hadamard needs equal blocks")
        by_block.setdefault(block, []).append(name)
    if not by_block:
        return None
    groups = {f"hadamard_{b}": {"type": "hadamard", "head_dim": b, "randomize": False, "requires_grad": False,
                                "precision": "torch.float32",
                                "apply": [{"targets": names, "location": "input", "inverse": False, "ignore": []}]}
              for b, names in sorted(by_block.items())}
    return {"config_groups": groups}


def quantization_config(net: nn.Module, recipe: QuantRecipe, linears: list[LinearBits]) -> dict[str, Any]:
    """config.json's quantization_config for `net`, quantized with `recipe`, whose weights are `linears`."""
    check_runtime_quant(KIND, recipe)      # what the recipe alone rules out (checked as it was read, too)
    if not linears:
        raise ValueError("compressed-tensors checkpoints hold quantized weights; this model has none quantized "
                         "(every linear protected or excluded)")
    fmts = {lb.fmt for lb in linears}
    nv = "nvfp4" in fmts
    if nv and len(fmts) > 1:
        raise ValueError(f"weights in {sorted(fmts)}: one compressed-tensors checkpoint holds one format")
    weights = _nv_weight_args() if nv else _mx_args(dynamic=False)
    fmt = "nvfp4-pack-quantized" if nv else "mxfp4-pack-quantized"
    # An MXFP4 input quantizer is the runtime's dynamic MXFP4 activation scheme (check_runtime_quant).
    inputs = _mx_args(dynamic=True) if recipe.input is not None else None
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
             "output_activations": None, "format": fmt}
    ignore = unquantized_linears(net, {lb.name for lb in linears})
    config: dict[str, Any] = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
                              "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None,
                              "sparsity_config": {}, "global_compression_ratio": None}
    transforms = _transform_config(net)
    if transforms is not None:
        config["transform_config"] = transforms
    return config


def _tensors(lb: LinearBits) -> dict[str, torch.Tensor]:
    out = {f"{lb.name}.weight_packed": lb.codes}
    if lb.fmt == "nvfp4":
        out[f"{lb.name}.weight_scale"] = lb.scales.view(torch.float8_e4m3fn)
        # compressed-tensors divides by its global scale: store the inverse of lpq's multiplier
        out[f"{lb.name}.weight_global_scale"] = (1.0 / lb.tensor_scale.float()).reshape(1)
    else:
        out[f"{lb.name}.weight_scale"] = lb.scales
    return out


def write_network(net: nn.Module, folder: Path, recipe: QuantRecipe, max_bytes: int,
                  tokenizer: Any = None) -> dict[str, Any]:
    """Write `net` (a causal LM quantized by lpq) as a compressed-tensors checkpoint into `folder`
    (export_model saves the tokenizer beside it). Returns the size counts of export_model's report."""
    from lpq.export.writer import _write_config

    require_causal_lm(net, "compressed-tensors")
    linears = linear_bits(net, WHAT, FORMATS)
    config = quantization_config(net, recipe, linears)
    dense = dense_tensors(net, skip={qw.key for qw in quantized_weights(net)})
    packed: dict[str, torch.Tensor] = {}
    for lb in linears:
        packed.update(_tensors(lb))
    tensors = {**dense, **packed}
    weight_map, files = write_shards(folder, STEM, tensors, {"format": "pt"}, max_bytes)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    if len(files) > 1:
        write_hf_index(folder, STEM, weight_map, nbytes(tensors.values()))
    _write_config(net, folder, config)
    return {"quantized_tensors": len(linears), "quantized_params": sum(lb.shape[0] * lb.shape[1] for lb in linears),
            "quantized_bytes": nbytes(packed.values()), "other_params": sum(t.numel() for t in dense.values()),
            "other_bytes": nbytes(dense.values())}

