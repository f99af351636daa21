"""Quantizing the attention probabilities P when P is computed in parts (row chunks or tiles).

TensorQuantizer quantizes a whole tensor: one scale from the whole P (current scaling), one set of
statistics for the whole P (delayed scaling's pending amax/RMS, tracked counts). The paths that
compute P in parts (the materialized path's causal row chunks, the tiled path, the fused kernels)
use these helpers to reach the same decisions: `choose_p_scale` finds the one scale (reading the
whole P's moments first where the scale depends on them), `quantize_part` quantizes each part with
it and adds the part's statistics, and `finish_p_quantizer` records what TensorQuantizer.forward
records. Parts left out (causally masked entries) are zeros of P: they add nothing to the amax, the
sum of squares or the counts, and the RMS is taken over all `numel` entries of P.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from lpq.formats import fake_quant, fake_quant_ste, get_format
from lpq.formats.api import StraightThrough, fake_quant_scaled, fake_quant_scaled_ste, fake_quant_stats, moments
from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.recipe import Scaling


class PQuant:
    """How the parts of P are quantized in one call: the format and the one scale for the whole P."""

    def __init__(self, quantizer: TensorQuantizer | None, scale: float | None):
        self.fmt = quantizer.spec.format if quantizer is not None else None
        self.scale = scale

    def __call__(self, pc: Tensor) -> Tensor:
        """The part quantized (straight-through gradient where `pc` requires one)."""
        if self.fmt is None:
            return pc
        grad = torch.is_grad_enabled() and pc.requires_grad
        if self.scale is None:
            return (fake_quant_ste if grad else fake_quant)(pc, self.fmt, -1)
        # Bit for bit what TensorQuantizer._quantize does with one scale for the whole tensor.
        return (fake_quant_scaled_ste if grad else fake_quant_scaled)(pc, self.fmt, self.scale, -1)


class PStats:
    """Whole-tensor statistics of P, summed over parts as tensors (no device syncs): amax and sum
    of squares (the quantizer's amax/RMS) and, with counts, the counts of `_record_stats`.
    `pending`: record amax/RMS as delayed scaling's pending statistics at the end."""

    def __init__(self, device: torch.device, pending: bool, counts: bool):
        self.pending, self.counts = pending, counts
        self.amax = torch.zeros((), dtype=torch.float32, device=device)
        self.sumsq = torch.zeros((), dtype=torch.float64, device=device)
        self.totals = {k: torch.zeros((), dtype=torch.int64, device=device) for k in ("overflow", "flushed", "coarse")}

    def add(self, amax: Tensor, sumsq: Tensor, counts: dict[str, Tensor] | None = None) -> None:
        # max is order-free (NaN propagates); the squares are summed in float64, so the order of
        # the parts does not matter at float32 precision
        self.amax = torch.maximum(self.amax, amax)
        self.sumsq = self.sumsq + sumsq
        for k, v in (counts or {}).items():
            if k in self.totals:
                self.totals[k] = self.totals[k] + v

    def rms(self, numel: int) -> Tensor:
        return (self.sumsq / max(numel, 1)).sqrt().float()


def moments_of_parts(parts: Iterable[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """amax and float64 sum of squares of the whole P from its parts (`moments` of each, combined)."""
    acc = PStats(device, False, False)
    for part in parts:
        acc.add(*moments(part))
    return acc.amax, acc.sumsq


def quantize_part(pquant: PQuant, stats: PStats | None, pc: Tensor) -> Tensor:
    """One part of P quantized with the call's scale, its statistics added to `stats` (None: none
    gathered); the gradient is the identity (straight-through) where `pc` requires one."""
    if stats is None:
        return pquant(pc)
    with torch.no_grad():   # quantized and measured in one pass (one Triton kernel on CUDA)
        pq, st = fake_quant_stats(pc, pquant.fmt, pquant.scale, -1, counts=stats.counts)
    stats.add(st.pop("amax"), st.pop("sumsq"), st)
    return StraightThrough.apply(pc, pq) if torch.is_grad_enabled() and pc.requires_grad else pq


def parts_unsupported_reason(quantizer: TensorQuantizer | None) -> str | None:
    """Why P cannot be quantized in parts exactly as the whole P would be (parts split the rows and
    end on whole format blocks along the keys), or None."""
    if quantizer is None:
        return None
    spec = quantizer.spec
    if spec.format == "nvfp4":
        return "P in nvfp4 needs the per-tensor scale of the whole P inside the format"
    if get_format(spec.format).block > 1 and spec.axis not in (-1, 3):
        return (f"P in the block format {spec.format} along axis {spec.axis} "
                f"(parts keep whole blocks along the keys only)")
    if quantizer.groups != 1:
        return "a P quantizer with several scale groups"
    return None


def _needs_stats_first(quantizer: TensorQuantizer) -> bool:
    scaling = quantizer.spec.scaling
    if scaling == Scaling.CURRENT:
        return True
    return scaling == Scaling.DELAYED and not bool((quantizer.scale > 0).all())


def choose_p_scale(quantizer: TensorQuantizer | None, device: torch.device, numel: int,
                   moments_of_p: Callable[[], tuple[Tensor, Tensor]]) -> tuple[PQuant, PStats | None]:
    """The scale P is quantized with, found as TensorQuantizer.forward finds it (a statistics pass,
    `moments_of_p()` -> (amax, sum of squares) of the whole P, first where the scale depends on this
    P), and the statistics still to gather while quantizing the parts (None: none)."""
    if quantizer is None:
        return PQuant(None, None), None
    track = quantizer.track_stats
    if quantizer.spec.scaling == Scaling.NONE:
        return PQuant(quantizer, None), (PStats(device, False, True) if track else None)
    if _needs_stats_first(quantizer):
        first = PStats(device, True, False)
        first.add(*moments_of_p())
        scale = quantizer._scale_for(first.amax.reshape(1), first.rms(numel).reshape(1), None)
        return PQuant(quantizer, float(scale.reshape(()))), (PStats(device, False, True) if track else None)
    # Delayed scaling with a stored scale: quantize with it; this call's statistics are recorded as
    # pending (training) after the parts are quantized.
    gather = quantizer.training or track
    stats = PStats(device, quantizer.training, track) if gather else None
    return PQuant(quantizer, float(quantizer.scale.reshape(()))), stats


def finish_p_quantizer(quantizer: TensorQuantizer | None, pquant: PQuant, stats: PStats | None,
                       numel: int) -> None:
    """Record what TensorQuantizer.forward would have recorded for the whole P."""
    if quantizer is None or stats is None:
        return
    if stats.pending:
        # Returns the stored scale (already used) and records the pending amax/RMS.
        quantizer._scale_for(stats.amax.reshape(1), stats.rms(numel).reshape(1), None)
    if quantizer.track_stats:
        totals = {"amax": stats.amax, "sumsq": stats.sumsq, **stats.totals}
        quantizer._record_fused_stats(totals, pquant.scale, numel, None)
