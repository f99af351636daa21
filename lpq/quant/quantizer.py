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

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lpq.formats import fake_quant, fake_quant_ste
from lpq.formats.api import (StraightThrough, fake_quant_scaled, fake_quant_scaled_ste, fake_quant_stats,
                             moments)
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
        if group is None and self.groups > 1:
            return self._forward_slices(x)
        spec = self.spec
        scale: float | None = None
        pending = False          # this call's statistics still go to delayed scaling's pending max
        if spec.scaling != Scaling.NONE:
            g = 0 if group is None else group
            stored = float(self.scale[g])
            if spec.scaling == Scaling.DELAYED and stored > 0:
                scale, pending = stored, self.training
            else:
                # The scale depends on this tensor: one statistics read first (current scaling, or
                # delayed scaling before its first update, which also records them as pending).
                amax, sumsq = moments(x)
                scale = float(self._scale_for(amax.reshape(1), _rms(sumsq, x.numel()).reshape(1), group)[0])
        out_dtype = self._compute_dtype(x)
        if not (pending or self.track_stats or out_dtype is not None):
            grad = torch.is_grad_enabled() and x.requires_grad
            if scale is None:
                return (fake_quant_ste if grad else fake_quant)(x, spec.format, spec.axis)
            return (fake_quant_scaled_ste if grad else fake_quant_scaled)(x, spec.format, scale, spec.axis)
        # One pass quantizes and measures: the delayed-scaling statistics, the tracked counts.
        stats: dict[str, Tensor] = {}
        y = _FakeQuantStatsSTE.apply(x, spec.format, scale, spec.axis, self.track_stats, out_dtype, stats)
        if pending:
            self._add_pending(stats["amax"].reshape(1), _rms(stats["sumsq"], x.numel()).reshape(1), group)
        if self.track_stats:
            self._record_fused_stats(stats, scale, x.numel(), group)
        return y

    def _compute_dtype(self, x: Tensor) -> torch.dtype | None:
        """bfloat16 when a training-mode weight or linear input is quantized under bfloat16 autocast:
        the matmul it feeds casts it to bfloat16 anyway, and a HiF8 value divided by a power of two is
        exact in bfloat16, so writing bfloat16 directly gives the same values without a float32 copy
        and a cast. None (x's dtype) otherwise; eval mode keeps x's dtype, as cached weights are
        reused outside autocast."""
        if (self.role in ("weight", "input") and self.training and x.dtype == torch.float32
                and self.spec.format == "hif8" and torch.is_autocast_enabled(x.device.type)
                and torch.get_autocast_dtype(x.device.type) == torch.bfloat16):
            return torch.bfloat16
        return None

    def _forward_slices(self, x: Tensor) -> Tensor:
        """One scale per leading-dim slice (the experts of a fused MoE weight), whole-tensor ops."""
        if x.shape[0] != self.groups:
            raise ValueError(f"{self.role} quantizer has {self.groups} groups but the tensor's leading "
                             f"dim is {x.shape[0]}")
        if self.spec.scaling == Scaling.NONE:
            return self._quantize(x, None)
        with torch.no_grad():
            xd = x.detach().reshape(self.groups, -1)
            lo, hi = torch.aminmax(xd, dim=1)
            # max |x| = max(max x, -min x): one read-only pass; abs() makes an all-zero slice's amax +0.
            amax = torch.maximum(hi, -lo).abs().float()
            sumsq = torch.linalg.vector_norm(xd, dim=1, dtype=torch.float64).square()
            scale = self._scale_for(amax, _rms(sumsq, xd.shape[1]), None)
        return self._quantize(x, scale)

    def _scale_for(self, amax: Tensor, rms: Tensor, group: int | None) -> Tensor:
        """The scale for these statistics (one per group of `group`, or all groups): current scaling
        computes and records it; delayed scaling returns the stored scale (computed here before the
        first update) and, in training, adds the statistics to the pending maximum."""
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
            self._add_pending(amax, rms, group)
        return scale

    def _add_pending(self, amax: Tensor, rms: Tensor, group: int | None) -> None:
        sl = slice(None) if group is None else slice(group, group + 1)
        torch.maximum(self.amax_pending[sl], amax, out=self.amax_pending[sl])
        torch.maximum(self.rms_pending[sl], rms, out=self.rms_pending[sl])

    def _quantize(self, x: Tensor, scale: Tensor | None) -> Tensor:
        """Per-slice quantization of _forward_slices (scale: one per group, or None)."""
        fq = fake_quant_ste if (torch.is_grad_enabled() and x.requires_grad) else fake_quant
        if scale is None:
            y = fq(x, self.spec.format, self.spec.axis)
            if self.track_stats:
                self._record_stats(x, y, None)
            return y
        scale = scale.reshape(-1, *([1] * (x.dim() - 1))).to(x.device)
        with torch.no_grad():
            xs = x.float() * scale
            ys = fake_quant(xs, self.spec.format, self.spec.axis)
            if self.track_stats:
                self._record_stats(xs, ys, scale)
            y = (ys / scale).to(x.dtype)
        # The same straight-through gradient as the fused op: the identity (see StraightThrough).
        return StraightThrough.apply(x, y) if fq is fake_quant_ste else y

    def history_amax(self, group: int | None) -> float | None:
        """The amax delayed scaling's current scale comes from (the reduced history), or None."""
        if self.spec.scaling != Scaling.DELAYED:
            return None
        hist = reduce_history(self.amax_history, self.spec.reduction)
        value = float(hist.amax() if group is None else hist[group])
        return value if value > 0 else None

    @torch.no_grad()
    def _record_fused_stats(self, stats: dict[str, Tensor], scale: float | None, numel: int,
                            group: int | None) -> None:
        n = max(numel, 1)
        amax = float(stats["amax"]) if numel else 0.0
        hist = self.history_amax(group)
        self.last_stats = {
            "amax": amax,
            "scale": scale,
            "overflow": float(stats["overflow"]) / n,
            "flushed": float(stats["flushed"]) / n,
            "coarse": float(stats["coarse"]) / n if self.spec.format == "hif8" else None,
            # > 1: this tensor exceeds the largest amax of the history its scale came from (the lag
            # of delayed scaling behind a growing tensor); None without a history.
            "amax_vs_history": amax / hist if hist else None,
        }

    @torch.no_grad()
    def _record_stats(self, xs: Tensor, ys: Tensor, scale: Tensor | None) -> None:
        finite = torch.isfinite(xs)
        n = max(xs.numel(), 1)
        amax = float(xs.abs().amax() / (scale.amax() if scale is not None else 1)) if xs.numel() else 0.0
        hist = self.history_amax(None)
        self.last_stats = {
            "amax": amax,
            "scale": float(scale.amax()) if scale is not None else None,
            "overflow": float((torch.isinf(ys) & finite).sum()) / n,
            "flushed": float(((ys == 0) & (xs != 0)).sum()) / n,
            "coarse": (float(((xs.abs() >= HIF8_COARSE) & finite).sum()) / n
                       if self.spec.format == "hif8" else None),
            "amax_vs_history": amax / hist if hist else None,
        }


def _rms(sumsq: Tensor, numel: int) -> Tensor:
    """float32 RMS from a float64 sum of squares (the convention of lpq.formats.api.moments)."""
    return (sumsq / max(numel, 1)).sqrt().float()


class _FakeQuantStatsSTE(torch.autograd.Function):
    """lpq.formats.api.fake_quant_stats in forward (its statistics go into the `sink` dict) and the
    identity (straight-through) gradient in backward, in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: str, scale: float | None, axis: int, counts: bool,
                out_dtype: torch.dtype | None, sink: dict) -> Tensor:
        ctx.in_dtype = x.dtype
        y, stats = fake_quant_stats(x, fmt, scale, axis, counts=counts, out_dtype=out_dtype)
        sink.update(stats)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.in_dtype), None, None, None, None, None, None


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
