"""SmoothQuant-style migration of activation range into the weights.

For a group of linears sharing one input x, per input channel j: s_j = max|x_j|^alpha / max|W_.j|^(1-alpha);
the layers then see x / s and weights W * s (the product is unchanged). The division is folded into
whatever produces x: an RMSNorm/LayerNorm weight, or the output rows of a preceding linear.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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
