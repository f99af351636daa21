"""TensorQuantizer: one role's fake quantization with its per-tensor scaling state in buffers.

Scaling state is per group: one group for an ordinary tensor, or one per leading-dim slice (the
experts of a fused MoE weight), or one per caller-chosen index (one per expert's activations).

Delayed scaling follows TransformerEngine: a call quantizes with the stored scale and, in training
mode, records this call's amax (and RMS) as pending. `update_delayed_scales(model)` — run by
`quantize_model`'s hook before every forward of the quantized model — all-reduces the pending
statistics with MAX across ranks, pushes them into the history and recomputes the scales. So the
scale used at step t comes from steps < t. Before the first update a quantizer uses current scaling.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lpq.formats import fake_quant, fake_quant_ste
from lpq.formats.api import StraightThrough, fake_quant_scaled, fake_quant_scaled_ste
from lpq.quant.recipe import QuantizerSpec, Scaling, ScaleTarget
from lpq.quant.scaling import compute_scale, reduce_history

HIF8_COARSE = 2.0 ** 8   # HiF8 values with exponent >= 8 keep only 1 mantissa bit


class TensorQuantizer(nn.Module):
    def __init__(self, spec: QuantizerSpec, role: str, groups: int = 1):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.spec = spec
        self.role = role
        self.groups = groups
        self.track_stats = False
        self.last_stats: dict[str, float | None] | None = None
        if spec.scaling != Scaling.NONE:
            n = spec.history_len if spec.scaling == Scaling.DELAYED else 1
            self.register_buffer("amax_history", torch.zeros(n, groups))
            self.register_buffer("rms_history", torch.zeros(n, groups))
            self.register_buffer("scale", torch.zeros(groups))   # 0: not set yet
        if spec.scaling == Scaling.DELAYED:
            self.register_buffer("amax_pending", torch.zeros(groups), persistent=False)
            self.register_buffer("rms_pending", torch.zeros(groups), persistent=False)

    def extra_repr(self) -> str:
        s = self.spec
        text = f"role={self.role}, format={s.format}, axis={s.axis}, scaling={s.scaling.value}"
        if s.scaling != Scaling.NONE:
            text += f", target={s.target.value}"
        if s.scaling == Scaling.DELAYED:
            text += f", history={s.history_len}, reduction={s.reduction.value}"
        return text + (f", groups={self.groups}" if self.groups > 1 else "")

    def forward(self, x: Tensor, group: int | None = None) -> Tensor:
        """Fake-quantize x. `group`: the group all of x belongs to; None: per leading-dim slice
        when the quantizer has several groups, else the whole tensor."""
        if self.spec.scaling == Scaling.NONE:
            return self._quantize(x, None)
        with torch.no_grad():
            amax, rms = self._statistics(x, group)
            scale = self._scale_for(amax, rms, group)
        return self._quantize(x, scale, group)

    def _statistics(self, x: Tensor, group: int | None) -> tuple[Tensor, Tensor]:
        per_slice = group is None and self.groups > 1
        if per_slice and x.shape[0] != self.groups:
            raise ValueError(f"{self.role} quantizer has {self.groups} groups but the tensor's leading "
                             f"dim is {x.shape[0]}")
        xd = x.detach()
        # max |x| = max(max x, -min x): one read-only pass instead of writing |x| out first. abs()
        # makes an all-zero tensor's amax +0 (not -0), as x.abs().amax() gives.
        lo, hi = torch.aminmax(xd.reshape(self.groups, -1), dim=1) if per_slice else torch.aminmax(xd)
        amax = torch.maximum(hi, -lo).abs().float().reshape(-1)
        if self.spec.target == ScaleTarget.WINDOW:
            # The norm accumulates in float32 without writing a float32 copy or the squares out (and
            # reads a non-contiguous whole tensor in place).
            norm = (torch.linalg.vector_norm(xd.reshape(self.groups, -1), dim=1, dtype=torch.float32) if per_slice
                    else torch.linalg.vector_norm(xd, dtype=torch.float32).reshape(1))
            rms = norm / math.sqrt(xd.numel() // self.groups if per_slice else xd.numel())
        else:
            rms = torch.zeros_like(amax)
        return amax, rms

    def _scale_for(self, amax: Tensor, rms: Tensor, group: int | None) -> Tensor:
        sl = slice(None) if group is None else slice(group, group + 1)
        if self.spec.scaling == Scaling.CURRENT:
            scale = compute_scale(amax, rms, self.spec)
            self.amax_history[0, sl] = amax
            self.rms_history[0, sl] = rms
            self.scale[sl] = scale
            return scale
        stored = self.scale[sl].clone()   # a copy: autograd keeps it until backward, after later updates
        scale = stored if bool((stored > 0).all()) else torch.where(stored > 0, stored,
                                                                   compute_scale(amax, rms, self.spec))
        if self.training:
            self.amax_pending[sl] = torch.maximum(self.amax_pending[sl], amax)
            self.rms_pending[sl] = torch.maximum(self.rms_pending[sl], rms)
        return scale

    def _quantize(self, x: Tensor, scale: Tensor | None, group: int | None = None) -> Tensor:
        fq = fake_quant_ste if (torch.is_grad_enabled() and x.requires_grad) else fake_quant
        if scale is None:
            y = fq(x, self.spec.format, self.spec.axis)
            if self.track_stats:
                self._record_stats(x, y, None)
            return y
        if group is None and self.groups > 1:
            scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
        else:
            scale = scale.reshape(())
            if not self.track_stats and x.device.type == "cpu":
                # One scale for the whole tensor: the fused op does the multiply, quantize, divide
                # and cast back in one pass where it can, with the same bits as the code below.
                # (CPU only: float(scale) would be a device sync elsewhere, and the kernel is CPU.)
                fqs = fake_quant_scaled_ste if fq is fake_quant_ste else fake_quant_scaled
                return fqs(x, self.spec.format, float(scale), self.spec.axis)
        scale = scale.to(x.device)
        with torch.no_grad():
            xs = x.float() * scale
            ys = fake_quant(xs, self.spec.format, self.spec.axis)
            if self.track_stats:
                self._record_stats(xs, ys, scale)
            y = (ys / scale).to(x.dtype)
        # The same straight-through gradient as the fused op: the identity (see StraightThrough).
        return StraightThrough.apply(x, y) if fq is fake_quant_ste else y

    @torch.no_grad()
    def _record_stats(self, xs: Tensor, ys: Tensor, scale: Tensor | None) -> None:
        finite = torch.isfinite(xs)
        n = max(xs.numel(), 1)
        self.last_stats = {
            "amax": float(xs.abs().amax() / (scale.amax() if scale is not None else 1)) if xs.numel() else 0.0,
            "scale": float(scale.amax()) if scale is not None else None,
            "overflow": float((torch.isinf(ys) & finite).sum()) / n,
            "flushed": float(((ys == 0) & (xs != 0)).sum()) / n,
            "coarse": (float(((xs.abs() >= HIF8_COARSE) & finite).sum()) / n
                       if self.spec.format == "hif8" else None),
        }


@torch.no_grad()
def update_delayed_scales(model: nn.Module) -> None:
    """Fold pending amax/RMS into every delayed quantizer's history and recompute its scale.

    With torch.distributed initialized, the pending statistics of all quantizers are all-reduced
    (MAX) in one call first, so every rank ends with the same scales. All ranks must call this the
    same number of times (it runs before each forward of a quantized model).
    """
    qs = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.spec.scaling == Scaling.DELAYED]
    if not qs:
        return
    device = qs[0].amax_pending.device
    flat = torch.cat([t.to(device) for q in qs for t in (q.amax_pending, q.rms_pending)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    if not bool(flat.any()):
        return   # no quantizer ran (quantization disabled, or eval): nothing would change (NaN counts as ran)
    # Quantizers with the same spec share one scale rule: update them together, a few tensor ops
    # per spec instead of per quantizer (hundreds per model, before every forward).
    batches: dict[tuple, tuple[list[TensorQuantizer], list[int], list[int]]] = {}
    offset = 0
    for q in qs:
        key = (id(q.spec), q.amax_history.device, q.amax_history.dtype, q.scale.dtype)
        members, amax_idx, rms_idx = batches.setdefault(key, ([], [], []))
        members.append(q)
        amax_idx.extend(range(offset, offset + q.groups))
        rms_idx.extend(range(offset + q.groups, offset + 2 * q.groups))
        offset += 2 * q.groups
    for members, amax_idx, rms_idx in batches.values():
        hist_device = members[0].amax_history.device
        amax = flat[torch.tensor(amax_idx, device=device)].to(hist_device)
        rms = flat[torch.tensor(rms_idx, device=device)].to(hist_device)
        _push_histories(members, amax, rms)


def _push_histories(qs: list[TensorQuantizer], amax: Tensor, rms: Tensor) -> None:
    """Push one step's amax/RMS (all groups of `qs`, concatenated) into the histories of quantizers
    that share one spec, and recompute their scales. Groups not called this step keep their state."""
    spec = qs[0].spec
    sizes = [q.groups for q in qs]
    seen = amax > 0
    updated = []
    for name, new in (("amax_history", amax), ("rms_history", rms)):
        hists = [getattr(q, name) for q in qs]
        hist = torch.cat(hists, dim=1)                     # (history_len, all groups)
        rolled = torch.roll(hist, 1, dims=0)
        rolled[0] = new
        hist = torch.where(seen[None], rolled, hist)
        torch._foreach_copy_(hists, list(hist.split(sizes, dim=1)))
        updated.append(hist)
    fresh = compute_scale(reduce_history(updated[0], spec.reduction), reduce_history(updated[1], spec.reduction), spec)
    scales = [q.scale for q in qs]
    torch._foreach_copy_(scales, list(torch.where(seen, fresh, torch.cat(scales)).split(sizes)))
    torch._foreach_zero_([t for q in qs for t in (q.amax_pending, q.rms_pending)])
