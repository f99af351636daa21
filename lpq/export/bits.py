"""The real bits of a quantized causal LM, in the checkpoint layout other runtimes read.

Shared by the compressed-tensors and GGUF exporters (lpq/export/compressed_tensors.py, gguf.py):
they write lpq's own codes and scales, never re-quantize, so everything here refuses what those
layouts cannot hold instead of approximating it:

* a weight no encoding reproduces (stored dense by a packed export) or one with a per-tensor
  prescale (`scaling` other than none: the runtimes have no such factor);
* a quantization axis other than the input dim, or an input dim that is not a multiple of the
  block (lpq pads the last block; the runtimes' layouts have no padding).

Fused MoE experts (transformers 5 `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)) are split
into the per-expert linears of the original checkpoints (`experts.{e}.gate_proj` / `up_proj` /
`down_proj`): the layout vLLM's and llama.cpp's converters load, and the one transformers merges
back into fused experts when it loads a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lpq.export.packing import QuantizedWeight, pack, quantized_weights
from lpq.formats import FORMATS, Packed
from lpq.quant.attention import AttentionQuantizers
from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.transforms import InputTransform

GATE_UP, DOWN = "gate_up_proj", "down_proj"


@dataclass
class LinearBits:
    """One linear of the checkpoint (an expert's projection counts as one): its packed weight."""

    name: str            # module name in the checkpoint, e.g. model.layers.0.mlp.experts.3.up_proj
    fmt: str
    shape: tuple[int, int]   # (out, in)
    codes: Tensor        # uint8 (out, in/2): element 2i in the low nibble
    scales: Tensor       # uint8 (out, in/block): E8M0 (mxfp4*) or E4M3 bits (nvfp4)
    tensor_scale: Tensor | None   # float32 scalar (nvfp4)
    dtype: torch.dtype   # the model's dtype for this weight


def _expert_rows(p: Packed, e: int, start: int, stop: int, out_per_expert: int) -> tuple[Tensor, Tensor]:
    """Codes and scales of rows [start, stop) of expert e of a fused (E, out, in) packed weight."""
    base = e * out_per_expert
    return p.codes[base + start:base + stop].contiguous(), p.scales[base + start:base + stop].contiguous()


def _check_weight(qw: QuantizedWeight, w_q: Tensor, p: Packed | None, what: str, formats: tuple[str, ...]) -> None:
    if qw.fmt not in formats:
        raise ValueError(f"{qw.key}: {qw.fmt} weights cannot be written as {what}, which stores "
                         f"{', '.join(formats)} weights only; use kind packed (lpq.load_quantized)")
    if qw.axis % w_q.dim() != w_q.dim() - 1:
        raise ValueError(f"{qw.key}: quantized along axis {qw.axis}; {what} needs blocks along the input dim "
                         f"(weight quantizer axis -1)")
    block = FORMATS[qw.fmt].block
    if w_q.shape[-1] % block:
        raise ValueError(f"{qw.key}: input dim {w_q.shape[-1]} is not a multiple of the {qw.fmt} block {block}; "
                         f"{what} has no padded blocks")
    if qw.prescale() is not None:
        raise ValueError(f"{qw.key}: the weight quantizer has per-tensor scaling ({qw.quantizer.spec.scaling.value}), "
                         f"which {what} cannot store; use scaling: none for {qw.fmt} weights")
    if p is None:
        raise ValueError(f"{qw.key}: no {qw.fmt} encoding reproduces this weight exactly (a packed export stores it "
                         f"dense); {what} cannot hold it")


def linear_bits(net: nn.Module, what: str, formats: tuple[str, ...]) -> list[LinearBits]:
    """Every quantized weight of `net` as checkpoint linears with their packed bits, in model order.

    `what` names the target in refusals; `formats`: the weight formats it can store."""
    out: list[LinearBits] = []
    with torch.no_grad():
        for qw in quantized_weights(net):
            w_q = qw.forward_weight().detach().cpu()
            p = pack(qw, w_q)
            _check_weight(qw, w_q, p, what, formats)
            if qw.attr == "weight":
                out.append(LinearBits(qw.key.removesuffix(".weight"), qw.fmt, tuple(w_q.shape), p.codes, p.scales,
                                      p.tensor_scale, w_q.dtype))
                continue
            experts = qw.key.removesuffix(qw.attr)    # "...mlp.experts."
            n_exp, rows, cols = w_q.shape
            halves = [("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows)] if qw.attr == GATE_UP \
                else [("down_proj", 0, rows)]
            for e in range(n_exp):
                for proj, start, stop in halves:
                    codes, scales = _expert_rows(p, e, start, stop, rows)
                    out.append(LinearBits(f"{experts}{e}.{proj}", qw.fmt, (stop - start, cols), codes, scales,
                                          p.tensor_scale, w_q.dtype))
    return out


def require_causal_lm(net: nn.Module, kind: str) -> None:
    """Refuse networks that are not transformers causal LMs (a Wan transformer, for instance)."""
    from transformers import PreTrainedModel

    if not isinstance(net, PreTrainedModel) or not net.can_generate():
        raise ValueError(f"export kind {kind} writes transformers causal LMs; a {type(net).__name__} exports as "
                         f"packed or fake")


def _lpq_state_prefixes(net: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}." for n, m in net.named_modules()
                 if isinstance(m, (TensorQuantizer, AttentionQuantizers, InputTransform)))


def dense_tensors(net: nn.Module, skip: set[str]) -> dict[str, Tensor]:
    """The model's other tensors under checkpoint names: no lpq state (quantizer buffers, transform
    scales), each shared tensor once (a tied lm_head is left to the loader), fused experts split."""
    lpq_state = _lpq_state_prefixes(net)
    seen: set[tuple] = set()
    out: dict[str, Tensor] = {}
    for key, t in net.state_dict().items():
        if key in skip or key.startswith(lpq_state):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        t = t.detach().cpu()
        attr = key.rpartition(".")[2]
        if attr in (GATE_UP, DOWN) and t.dim() == 3:
            experts = key.removesuffix(attr)
            for e in range(t.shape[0]):
                if attr == GATE_UP:
                    gate, up = t[e].chunk(2, dim=0)
                    out[f"{experts}{e}.gate_proj.weight"] = gate.contiguous()
                    out[f"{experts}{e}.up_proj.weight"] = up.contiguous()
                else:
                    out[f"{experts}{e}.down_proj.weight"] = t[e].contiguous()
            continue
        out[key] = t
    return out


def unquantized_linears(net: nn.Module, quantized: set[str]) -> list[str]:
    """Checkpoint names of the linears (expert projections included) left in high precision."""
    names: list[str] = []
    for key, t in net.state_dict().items():
        attr = key.rpartition(".")[2]
        if attr in (GATE_UP, DOWN) and t.dim() == 3:
            experts = key.removesuffix(attr)
            projs = ("gate_proj", "up_proj") if attr == GATE_UP else ("down_proj",)
            names += [f"{experts}{e}.{p}" for e in range(t.shape[0]) for p in projs]
        elif attr == "weight" and t.dim() == 2:
            # a 2-D weight outside an embedding is a matmul: a linear, or a MoE router (a Linear in vLLM)
            if not isinstance(net.get_submodule(key.removesuffix(".weight")), nn.Embedding):
                names.append(key.removesuffix(".weight"))
    return [n for n in names if n not in quantized]
