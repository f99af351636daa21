"""Per-tensor scale rules (pure functions on per-group statistics).

Scales multiply the tensor before the format's quantizer and divide it after. Power-of-two scales
make both steps exact, so the only rounding is the format's own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lpq.quant.recipe import QuantizerSpec, Reduction, ScaleTarget


def floor_log2(x: Tensor) -> Tensor:
    """floor(log2(x)) for positive finite x, exact (from the float's exponent, not from log2)."""
    _, e = torch.frexp(x)
    return (e - 1).to(torch.float32)


def compute_scale(amax: Tensor, rms: Tensor, spec: QuantizerSpec) -> Tensor:
    """Scale per group from amax and RMS (float32, same shape); 1 where there is no usable data."""
    amax = amax.float()
    usable = (amax > 0) & torch.isfinite(amax)
    safe_amax = torch.where(usable, amax, torch.ones_like(amax))
    limit = spec.limit()
    if spec.target == ScaleTarget.WINDOW:
        rms = rms.float()
        safe_rms = torch.where((rms > 0) & torch.isfinite(rms), rms, safe_amax)
        k = torch.round(spec.window_center - torch.log2(safe_rms))
        if limit is not None:
            # amax * 2^k <= limit / 2^margin, so nothing overflows to Inf
            k = torch.minimum(k, floor_log2(limit / safe_amax) - spec.margin)
        scale = torch.exp2(k)
    else:
        target = spec.amax_target if spec.amax_target is not None else limit
        scale = target / safe_amax / 2.0 ** spec.margin
        if spec.power_of_two:
            scale = torch.exp2(floor_log2(scale))
    return torch.where(usable, scale, torch.ones_like(scale))


def reduce_history(history: Tensor, reduction: Reduction) -> Tensor:
    """(N, G) history, newest first -> (G,) statistic."""
    return history.amax(dim=0) if reduction == Reduction.MAX else history[0]
