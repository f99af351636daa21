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

import weakref

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
        self._out: Tensor | None = None     # see _output_buffer
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
        out_dtype = self._compute_dtype(x)
        stored = float(self.scale[0 if group is None else group]) if spec.scaling != Scaling.NONE else 0.0
        memo_key = None
        if self.role == "input":
            # Linears that share their input (q/k/v, gate/up) quantize it once: same tensor, same spec
            # and scale state -> the same result (see _LastInput).
            memo_key = (spec, group, stored if spec.scaling == Scaling.DELAYED else None, self.training,
                        torch.is_grad_enabled(), self.track_stats, out_dtype)
            hit = _LAST_INPUT.get(x, memo_key)
            if hit is not None:
                return self._replay(hit, group, x.numel())
        scale: float | None = None
        amax = rms = scale_t = None
        pending = False          # this call's statistics still go to delayed scaling's pending max
        if spec.scaling != Scaling.NONE:
            if spec.scaling == Scaling.DELAYED and stored > 0:
                scale, pending = stored, self.training
            else:
                # The scale depends on this tensor: one statistics read first (current scaling, or
                # delayed scaling before its first update, which also records them as pending).
                amax, sumsq = moments(x)
                amax, rms = amax.reshape(1), _rms(sumsq, x.numel()).reshape(1)
                scale_t = self._scale_for(amax, rms, group)
                scale = float(scale_t[0])
        out = self._output_buffer(x, out_dtype)
        stats: dict[str, Tensor] = {}
        if not (pending or self.track_stats or out_dtype is not None or out is not None):
            grad = torch.is_grad_enabled() and x.requires_grad
            if scale is None:
                y = (fake_quant_ste if grad else fake_quant)(x, spec.format, spec.axis)
            else:
                y = (fake_quant_scaled_ste if grad else fake_quant_scaled)(x, spec.format, scale, spec.axis)
        else:
            # One pass quantizes and measures: the delayed-scaling statistics, the tracked counts.
            y = _FakeQuantStatsSTE.apply(x, spec.format, scale, spec.axis, self.track_stats, out_dtype, out, stats)
            if pending:
                amax, rms = stats["amax"].reshape(1), _rms(stats["sumsq"], x.numel()).reshape(1)
                self._add_pending(amax, rms, group)
            if self.track_stats:
                self._record_fused_stats(stats, scale, x.numel(), group)
        if memo_key is not None:
            _LAST_INPUT.put(x, memo_key, _Result(y, amax, rms, scale_t, scale, stats))
        return y

    def _replay(self, hit: _Result, group: int | None, numel: int) -> Tensor:
        """What forward would have recorded for the tensor `hit` was computed from, and its result."""
        spec = self.spec
        if spec.scaling == Scaling.CURRENT:
            sl = slice(None) if group is None else slice(group, group + 1)
            self.amax_history[0, sl] = hit.amax
            self.rms_history[0, sl] = hit.rms
            self.scale[sl] = hit.scale_t
        elif spec.scaling == Scaling.DELAYED and self.training and hit.amax is not None:
            self._add_pending(hit.amax, hit.rms, group)
        if self.track_stats:
            self._record_fused_stats(hit.stats, hit.scale, numel, group)
        return hit.y

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

    def _output_buffer(self, x: Tensor, out_dtype: torch.dtype | None) -> Tensor | None:
        """The tensor a training-mode weight quantization writes into, kept across calls.

        A weight is quantized once per forward, and the quantized copy (a weight-sized tensor) lives
        until that step's backward. Allocating it afresh every step costs more than quantizing it on a
        CPU (new pages are faulted in and zeroed by the kernel: measured about 2/3 of the weight
        quantization time on SmolLM2), so it is written into the same memory each step. Safe because a
        training step's backward ends before the next forward quantizes again, and the weight does not
        change in between; the previous call's result is overwritten, so callers must not keep it
        across calls. CPU only (a GPU allocator caches its blocks), dropped in eval mode."""
        if not (self.role == "weight" and self.training and torch.is_grad_enabled() and x.requires_grad
                and x.device.type == "cpu"):
            return None
        dtype = out_dtype or x.dtype
        buf = self._out
        if buf is None or buf.shape != x.shape or buf.dtype != dtype or buf.device != x.device:
            buf = self._out = torch.empty(x.shape, dtype=dtype, device=x.device)
        return buf

    def train(self, mode: bool = True) -> TensorQuantizer:
        if not mode:
            self._out = None
        return super().train(mode)

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


class _Result:
    """One quantization and what it measured (None where that path measured nothing)."""

    def __init__(self, y: Tensor, amax: Tensor | None, rms: Tensor | None, scale_t: Tensor | None,
                 scale: float | None, stats: dict[str, Tensor]):
        self.y, self.amax, self.rms, self.scale_t, self.scale, self.stats = y, amax, rms, scale_t, scale, stats


class _LastInput:
    """The last linear-input quantization, for the next input quantizer given the very same tensor.

    The q/k/v projections (and gate/up) each own an input quantizer, with one spec object and, as they
    see the same tensor every step, the same history and scale; quantizing their shared input once
    saves two of every three passes there. A hit needs the same tensor object at the same version
    (not modified in place since), the same spec object, the same stored scale (delayed scaling) and
    the same mode, grad mode, stats tracking and output dtype, so its result is the one the quantizer
    would compute, bit for bit. The input is held weakly and the entry dropped with it: the cache
    never keeps an activation alive that the model has let go (under activation checkpointing the
    last MLP input and its quantized copy would otherwise stay through the whole backward pass:
    2 x 32,760 x 8,960 float32 values, 2.3 GB, at Wan2.1's 81 x 480 x 832)."""

    def __init__(self) -> None:
        self.x: weakref.ref | None = None
        self.version = -1
        self.key: tuple | None = None
        self.result: _Result | None = None

    def get(self, x: Tensor, key: tuple) -> _Result | None:
        if self.x is not None and self.x() is x and x._version == self.version and key == self.key:
            return self.result
        return None

    def put(self, x: Tensor, key: tuple, result: _Result) -> None:
        self.x, self.version, self.key, self.result = weakref.ref(x, self._drop), x._version, key, result

    def _drop(self, ref: weakref.ref) -> None:
        if self.x is ref:
            self.x, self.key, self.result = None, None, None


_LAST_INPUT = _LastInput()


def _rms(sumsq: Tensor, numel: int) -> Tensor:
    """float32 RMS from a float64 sum of squares (the convention of lpq.formats.api.moments)."""
    return (sumsq / max(numel, 1)).sqrt().float()


class _FakeQuantStatsSTE(torch.autograd.Function):
    """lpq.formats.api.fake_quant_stats in forward (into `out` if given; its statistics go into the
    `sink` dict) and the identity (straight-through) gradient in backward, in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: str, scale: float | None, axis: int, counts: bool,
                out_dtype: torch.dtype | None, out: Tensor | None, sink: dict) -> Tensor:
        ctx.in_dtype = x.dtype
        y, stats = fake_quant_stats(x, fmt, scale, axis, counts=counts, out_dtype=out_dtype, out=out)
        sink.update(stats)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.in_dtype), None, None, None, None, None, None, None


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
    plan = _delayed_plan(model, qs)
    flat = torch.cat(plan.pending if plan.one_device else [t.to(plan.device) for t in plan.pending])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    if not bool(flat.any()):
        return   # no quantizer ran (quantization disabled, or eval): nothing would change (NaN counts as ran)
    for batch in plan.batches:
        amax = flat[batch.amax_idx].to(batch.device)
        rms = flat[batch.rms_idx].to(batch.device)
        _push_histories(batch, amax, rms)
    torch._foreach_zero_(plan.pending)


class _Batch:
    """Delayed quantizers that share one spec (and device/dtypes): updated together, a few tensor ops
    per spec instead of per quantizer (hundreds per model, before every forward)."""

    def __init__(self, spec: QuantizerSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.sizes: list[int] = []
        self.amax_hist: list[Tensor] = []
        self.rms_hist: list[Tensor] = []
        self.scales: list[Tensor] = []
        self.amax_idx: list[int] | Tensor = []
        self.rms_idx: list[int] | Tensor = []


class _DelayedPlan:
    """The buffers update_delayed_scales reads and writes, gathered once per set of quantizers (reading
    a module's buffers through nn.Module attribute lookup costs more than the update itself)."""

    def __init__(self, qs: list[TensorQuantizer]):
        bufs = [q._buffers for q in qs]
        self.pending = [t for b in bufs for t in (b["amax_pending"], b["rms_pending"])]
        self.device = self.pending[0].device
        self.one_device = all(t.device == self.device for t in self.pending)
        batches: dict[tuple, _Batch] = {}
        offset = 0
        for q, b in zip(qs, bufs):
            hist = b["amax_history"]
            batch = batches.setdefault((id(q.spec), hist.device, hist.dtype, b["scale"].dtype), _Batch(q.spec, hist.device))
            batch.sizes.append(q.groups)
            batch.amax_hist.append(hist)
            batch.rms_hist.append(b["rms_history"])
            batch.scales.append(b["scale"])
            batch.amax_idx.extend(range(offset, offset + q.groups))
            batch.rms_idx.extend(range(offset + q.groups, offset + 2 * q.groups))
            offset += 2 * q.groups
        for batch in batches.values():
            batch.amax_idx = torch.tensor(batch.amax_idx, device=self.device)
            batch.rms_idx = torch.tensor(batch.rms_idx, device=self.device)
        self.batches = list(batches.values())


def _delayed_plan(model: nn.Module, qs: list[TensorQuantizer]) -> _DelayedPlan:
    """The model's cached plan, rebuilt when its delayed quantizers or their buffers change (a new
    quantizer, `.to()`, a replaced buffer)."""
    key = tuple((id(q), id(q.spec), *map(id, q._buffers.values())) for q in qs)
    cached = model.__dict__.get("_lpq_delayed_plan")
    if cached is None or cached[0] != key:
        cached = (key, _DelayedPlan(qs))
        model.__dict__["_lpq_delayed_plan"] = cached
    return cached[1]


def _push_histories(batch: _Batch, amax: Tensor, rms: Tensor) -> None:
    """Push one step's amax/RMS (all groups of the batch, concatenated) into the histories of its
    quantizers and recompute their scales. Groups not called this step keep their state."""
    seen = amax > 0
    updated = []
    for hists, new in ((batch.amax_hist, amax), (batch.rms_hist, rms)):
        hist = torch.cat(hists, dim=1)                     # (history_len, all groups)
        rolled = torch.roll(hist, 1, dims=0)
        rolled[0] = new
        hist = torch.where(seen[None], rolled, hist)
        torch._foreach_copy_(hists, list(hist.split(batch.sizes, dim=1)))
        updated.append(hist)
    spec = batch.spec
    fresh = compute_scale(reduce_history(updated[0], spec.reduction), reduce_history(updated[1], spec.reduction), spec)
    torch._foreach_copy_(batch.scales, list(torch.where(seen, fresh, torch.cat(batch.scales)).split(batch.sizes)))
