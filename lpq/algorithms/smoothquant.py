"""SmoothQuant-style migration of activation range into the weights.

For a group of linears sharing one input x, per input channel j: s_j = max|x_j|^alpha / max|W_.j|^(1-alpha);
the layers then see x / s and weights W * s (the product is unchanged). The division is folded into
whatever produces x: an RMSNorm/LayerNorm weight, or the output rows of a preceding linear (the
family's adapter names these producers); otherwise the linears divide their input by s online.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lpq.algorithms.context import BlockContext, RunContext
from lpq.algorithms.hadamard import rotate_weight
from lpq.algorithms.step import Phase, Step, register
from lpq.quant.transforms import InputTransform


def smooth_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float = 0.5, eps: float = 1e-5) -> Tensor:
    """Per-input-channel scales s (in,) for linears with weights (out_k, in) sharing the input."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).float()
    a = act_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w_absmax.clamp(min=eps).pow(1 - alpha)
    return s.clamp(min=eps)


def scale_linear_inputs(linears: list[nn.Linear], s: Tensor) -> None:
    """W <- W * s along the input dim (the consumers of x / s)."""
    with torch.no_grad():
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype))


def fold_into_norm(norm: nn.Module, s: Tensor) -> None:
    """norm.weight <- norm.weight / s (and its bias), so the norm's output is x / s."""
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(norm).__name__} has no affine weight to fold a smoothing scale into")
    with torch.no_grad():
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))


def fold_into_linear_outputs(linear: nn.Linear, s: Tensor) -> None:
    """Output rows of a producer linear divided by s (its output becomes x / s)."""
    with torch.no_grad():
        linear.weight.div_(s.to(linear.weight.dtype).unsqueeze(1))
        if linear.bias is not None:
            linear.bias.div_(s.to(linear.bias.dtype))


@dataclass
class SmoothQuantSettings:
    alpha: float = 0.5            # migration strength: 0 keeps the activations, 1 moves all range to weights

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@register
class SmoothQuant(Step):
    """Per group of linears sharing an input, at block start: scales from the calibration inputs'
    per-channel max, folded into the producer where the adapter names one, else applied online."""

    name = "smoothquant"
    Settings = SmoothQuantSettings
    phase = Phase.TRANSFORM
    transform_part = "scale"

    def on_block_start(self, run: RunContext, block: BlockContext) -> None:
        groups = block.groups()
        amax = block.input_absmax([g.names[0] for g in groups])
        modules = dict(block.module.named_modules())
        folds = {frozenset(consumers): producer for consumers, producer in run.adapter.folds}
        for group in groups:
            transforms = [lin.input_transform for lin in group.linears]
            rots = {t.hadamard_block if t is not None else None for t in transforms}
            if len(rots) > 1:
                raise ValueError(f"linears {group.names} share one input but not one rotation: list all of them, "
                                 "or none, in hadamard.linears")
            if any(t is not None and t.input_scale is not None for t in transforms):
                raise ValueError(f"linears {group.names} already divide their input by a scale")
            rot = rots.pop()
            # Rotated weights: smoothing acts on the unrotated input, so un-rotate the weight (H is its
            # own inverse) to score it, then W H <- (W diag(s)) H.
            ws = [lin.weight.float() for lin in group.linears]
            if rot:
                ws = [rotate_weight(w, rot) for w in ws]
            s = smooth_scales(amax[group.names[0]], ws, self.settings.alpha)
            if rot:
                with torch.no_grad():
                    for lin, w in zip(group.linears, ws):
                        lin.weight.copy_(rotate_weight(w * s, rot).to(lin.weight.dtype))
            else:
                scale_linear_inputs(group.linears, s)
            producer = folds.get(frozenset(group.names))
            if producer is None or producer not in modules:
                for lin in group.linears:
                    lin.input_transform = InputTransform(rot, s)
            elif hasattr(modules[producer], "in_features"):
                fold_into_linear_outputs(modules[producer], s)   # output rows: commutes with an input rotation
            else:
                fold_into_norm(modules[producer], s)
