"""Public numerics API: fake_quant / encode / decode on any tensor, any axis, kernel or reference."""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from lpq.formats._build import load_kernel
from lpq.formats.spec import FormatSpec, get_format

BIT_ORDER_VERSION = 1   # layout of Packed, see docs/design.md; bump on any change
SPEC_VERSION = 1        # semantics of the format names; bump on any change

_BACKENDS = ("auto", "cpp", "ref", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Packed:
    """The real bits of a quantized tensor (layout: docs/design.md, bit-order version 1)."""

    fmt: str
    shape: tuple[int, ...]
    axis: int                      # non-negative axis of `shape` that was quantized
    codes: Tensor                  # uint8 (rows, Lp) for hif8, (rows, Lp/2) nibbles otherwise
    scales: Tensor | None          # uint8 block scales, or None (hif8)
    tensor_scale: Tensor | None    # float32 scalar (nvfp4), or None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.tensor_scale)
                   if t is not None)


def _family(spec: FormatSpec) -> ModuleType:
    return importlib.import_module(f"lpq.formats.{spec.family}")


def _backend(backend: str | None) -> str:
    b = backend or os.environ.get("LPQ_BACKEND", "auto")
    if b not in _BACKENDS:
        raise ValueError(f"unknown backend {b!r}; valid: {', '.join(_BACKENDS)} (argument or LPQ_BACKEND)")
    return b


def _kernel(spec: FormatSpec, x: Tensor, backend: str | None):
    """The C++ extension to use for this call, or None for the reference path."""
    b = _backend(backend)
    if b in ("ref", "triton") or x.device.type != "cpu":
        return None
    ext = load_kernel(spec.family)
    if ext is None and b == "cpp":
        from lpq.formats._build import why_unavailable

        raise RuntimeError(f"C++ kernel for {spec.name} requested but unavailable: {why_unavailable(spec.family)}")
    return ext


def _triton(x: Tensor, backend: str | None) -> bool:
    """Whether this call runs lpq.kernels' Triton kernels: under "auto" for CUDA tensors (when
    triton is installed), under "triton" always (CPU tensors through TRITON_INTERPRET=1)."""
    b = _backend(backend)
    if b == "triton":
        from lpq import kernels

        why = kernels.why_unavailable(x.device)
        if why is not None:
            raise RuntimeError(f"Triton kernels requested but unavailable: {why}")
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the Triton kernels take {', '.join(map(str, _TRITON_DTYPES))}, got {x.dtype}")
        return True
    if b != "auto" or x.device.type != "cuda" or x.dtype not in _TRITON_DTYPES:
        return False
    from lpq import kernels

    return kernels.available(x.device)


def _triton_fake_quant(x: Tensor, fmt: str, axis: int, scale: float | None, stats=None) -> Tensor:
    from lpq.kernels.formats import fake_quant_rows

    if get_format(fmt).block == 1:   # elementwise: any axis, no transposed copy
        return fake_quant_rows(x.contiguous().reshape(1, -1), fmt, scale, stats).reshape(x.shape)
    return _from_rows(fake_quant_rows(_as_rows(x, axis), fmt, scale, stats), x, axis)


def _check(x: Tensor, axis: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {x.dtype}")
    nd = max(x.dim(), 1)
    if not -nd <= axis < nd:
        raise ValueError(f"axis {axis} out of range for a tensor with {x.dim()} dims")
    return axis % nd


def _as_rows(x: Tensor, axis: int) -> Tensor:
    """View x as (rows, L) with `axis` last; contiguous (copies only when it must)."""
    xm = x.reshape(1) if x.dim() == 0 else x
    xm = xm.movedim(axis, -1)
    return xm.reshape(math.prod(xm.shape[:-1]), xm.shape[-1]).contiguous()


def _pad(x2d: Tensor, block: int) -> Tensor:
    L = x2d.shape[1]
    Lp = -(-L // block) * block
    return x2d if Lp == L else torch.nn.functional.pad(x2d, (0, Lp - L))


def _from_rows(y2d: Tensor, x: Tensor, axis: int) -> Tensor:
    if x.dim() == 0:
        return y2d.reshape(())
    moved = list(x.shape)
    moved.append(moved.pop(axis))
    return y2d.reshape(moved).movedim(-1, axis)


def fake_quant(x: Tensor, fmt: str, axis: int = -1, *, backend: str | None = None) -> Tensor:
    """Quantize then dequantize `x` along `axis`; float32 arithmetic, returns x's dtype and shape.
    Backends (argument or LPQ_BACKEND): auto (C++ on CPU, Triton on CUDA, else the reference), cpp,
    ref, triton (CPU tensors only under TRITON_INTERPRET=1)."""
    spec = get_format(fmt)
    axis = _check(x, axis)
    if x.numel() == 0:
        return x.clone()
    if _triton(x, backend):
        return _triton_fake_quant(x, fmt, axis, None)
    x2d = _as_rows(x, axis)
    ext = _kernel(spec, x2d, backend)
    if ext is not None and x2d.dtype in (torch.float32, torch.bfloat16, torch.float16):
        y2d = ext.fake_quant(x2d, fmt, torch.empty_like(x2d))
    else:
        L = x2d.shape[1]
        y2d = _family(spec).fake_quant_ref(_pad(x2d.float(), spec.block), fmt)[:, :L].to(x.dtype)
    return _from_rows(y2d, x, axis)


def encode(x: Tensor, fmt: str, axis: int = -1, *, backend: str | None = None) -> Packed:
    """The real bits of `x` in `fmt` (see Packed); decode(encode(x)) == fake_quant(x.float())."""
    spec = get_format(fmt)
    axis = _check(x, axis)
    x2d = _as_rows(x, axis)
    if x2d.numel() == 0:  # nothing to encode; keep the row count so the layout stays (rows, ...)
        return Packed(fmt, tuple(x.shape), axis, torch.empty(x2d.shape[0], 0, dtype=torch.uint8), None, None)
    ext = _kernel(spec, x2d, backend)
    if ext is not None and x2d.dtype in (torch.float32, torch.bfloat16, torch.float16):
        codes, scales, tscale = ext.encode(x2d, fmt)
    else:
        codes, scales, tscale = _family(spec).encode_ref(_pad(x2d.float(), spec.block), fmt)
    return Packed(fmt, tuple(x.shape), axis, codes, scales, tscale)


def decode(p: Packed, *, backend: str | None = None) -> Tensor:
    """float32 values of a Packed tensor, in its original shape."""
    spec = get_format(p.fmt)
    shape = p.shape
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=torch.float32)
    L = 1 if len(shape) == 0 else shape[p.axis]
    Lp = -(-L // spec.block) * spec.block
    ext = _kernel(spec, p.codes, backend)
    if ext is not None and p.codes.numel():
        y2d = ext.decode(p.codes, p.scales, p.tensor_scale, p.fmt, Lp)
    else:
        y2d = _family(spec).decode_ref(p.codes, p.scales, p.tensor_scale, p.fmt, Lp)
    template = torch.empty(shape, dtype=torch.float32, device="meta")
    return _from_rows(y2d[:, :L].contiguous(), template, p.axis)


class FakeQuantSTE(torch.autograd.Function):
    """fake_quant in forward, identity (straight-through) gradient in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: str, axis: int = -1) -> Tensor:
        return fake_quant(x, fmt, axis)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


def fake_quant_ste(x: Tensor, fmt: str, axis: int = -1) -> Tensor:
    return FakeQuantSTE.apply(x, fmt, axis)


def _fused_scale_ok(spec: FormatSpec, x: Tensor, scale: float) -> bool:
    """Whether the one-pass kernel computes fake_quant_scaled: HiF8 (block size 1, so the axis does
    not matter), float32 or bfloat16 on CPU, and a power-of-two scale with a normal reciprocal."""
    mant, exp = math.frexp(scale)
    return (spec.family == "hif8" and x.dtype in (torch.float32, torch.bfloat16) and mant == 0.5
            and -125 <= exp <= 127)


def fake_quant_scaled(x: Tensor, fmt: str, scale: float, axis: int = -1, *, backend: str | None = None) -> Tensor:
    """`(fake_quant(x.float() * scale, fmt, axis) / scale).to(x.dtype)` with scale a float32 number.

    For HiF8 on CPU with a power-of-two scale this is one pass of the C++ kernel (no float32 copy of
    a bfloat16 x, no scaled intermediate), identical bit for bit to the expression above; on CUDA
    tensors one pass of lpq.kernels' Triton kernel, any format, also identical.
    """
    spec = get_format(fmt)
    axis = _check(x, axis)
    if x.numel() and _triton(x, backend):
        return _triton_fake_quant(x, fmt, axis, scale)
    if x.numel() and _fused_scale_ok(spec, x, scale):
        xc = x.contiguous()
        ext = _kernel(spec, xc, backend)
        if ext is not None:
            return ext.fake_quant_scaled(xc, fmt, scale, torch.empty_like(xc))
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    return (fake_quant(x.float() * s, fmt, axis, backend=backend) / s).to(x.dtype)


class StraightThrough(torch.autograd.Function):
    """Returns `y` (a quantized version of `x`) with the gradient of the identity to `x`.

    The straight-through estimator of scaled fake quantization: the scale and its inverse cancel,
    and the quantizer counts as the identity. (Autograd through `q(x * s) / s` would give
    `g / s * s`, which differs from `g` only where `g / s` leaves float32's normal range.)"""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class FakeQuantScaledSTE(torch.autograd.Function):
    """fake_quant_scaled in forward, identity (straight-through) gradient in backward. The same
    gradient as StraightThrough, in one Function: this is the training hot path (measured ~15 us a
    call cheaper than a no-grad forward plus StraightThrough)."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt: str, scale: float, axis: int = -1) -> Tensor:
        return fake_quant_scaled(x, fmt, scale, axis)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None


def fake_quant_scaled_ste(x: Tensor, fmt: str, scale: float, axis: int = -1) -> Tensor:
    return FakeQuantScaledSTE.apply(x, fmt, scale, axis)


def moments(x: Tensor, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(max |x| as a float32 0-d tensor, NaN if x holds one; sum of x^2 as a float64 0-d tensor) of
    the whole tensor: what the per-tensor scale rules need (RMS = sqrt(sumsq / numel)). One read
    by a Triton kernel on CUDA or by the C++ kernel on CPU (float32 / bfloat16), whole-tensor ops
    elsewhere (the same amax; the float64 sums agree to float64 rounding)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"moments expects a floating-point tensor, got {type(x).__name__}")
    if _triton(x, backend):
        from lpq.kernels.formats import moments as triton_moments

        return triton_moments(x)
    ext = _stats_kernel(x, backend)
    if ext is not None:   # CPU: one read, no |x| or float64 copies (the same amax and float64 sums)
        res = ext.moments(x.detach().contiguous())
        return res[0].float(), res[1]
    xd = x.detach()
    amax = xd.abs().amax().float() if xd.numel() else torch.zeros((), device=x.device)
    return amax, xd.double().square().sum()


def _stats_kernel(x: Tensor, backend: str | None, fmt: str = "hif8", scale: float | None = None):
    """The C++ HiF8 extension when it computes statistics (and the scaled quantization) of x in one
    CPU pass: float32 or bfloat16 x, a HiF8 format, a power-of-two scale (or none); else None."""
    if x.numel() == 0 or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        return None
    spec = get_format(fmt)
    if spec.family != "hif8" or (scale is not None and not _fused_scale_ok(spec, x, scale)):
        return None
    ext = _kernel(spec, x, backend)
    return ext if ext is not None and hasattr(ext, "moments") else None


def fake_quant_stats(x: Tensor, fmt: str, scale: float | None = None, axis: int = -1, *, counts: bool = False,
                     backend: str | None = None, out_dtype: torch.dtype | None = None, out: Tensor | None = None
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """fake_quant (scale None) or fake_quant_scaled of x, with the statistics QAT records gathered
    in the same pass: "amax" and "sumsq" of x (see moments) and, with counts=True, over
    xs = x * scale and ys = fake_quant(xs) (float32): "overflow" (ys infinite where xs is finite),
    "flushed" (ys == 0 != xs) and for HiF8 "coarse" (finite |xs| >= 2^8), int64 0-d tensors.
    One Triton pass on CUDA (counts always gathered there), one C++ pass for HiF8 on CPU (float32 or
    bfloat16, power-of-two scale); elsewhere the same numbers from the fake_quant above plus
    whole-tensor ops. `out_dtype`: the result's dtype (default x's); the C++ pass writes bfloat16
    directly for a float32 x (the same values as casting the float32 result). `out`: a tensor of x's
    shape and the result's dtype to write the result into (and return), instead of a new one."""
    axis = _check(x, axis)
    ext = _stats_kernel(x, backend, fmt, scale)
    dtype = out_dtype or x.dtype
    if out is not None and (out.shape != x.shape or out.dtype != dtype or out.device != x.device):
        raise ValueError(f"fake_quant_stats: out must be {dtype} {tuple(x.shape)} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if ext is not None and out_dtype in (None, x.dtype, torch.bfloat16) and (out is None or out.is_contiguous()):
        xc = x.contiguous()
        y = torch.empty_like(xc, dtype=dtype) if out is None else out
        res = ext.fake_quant_scaled_stats(xc, fmt, 1.0 if scale is None else scale, y, counts)
        stats = {"amax": res[0].float(), "sumsq": res[1]}
        if counts:
            stats.update(overflow=res[2].long(), flushed=res[3].long(), coarse=res[4].long())
        return y, stats
    y, stats = _fake_quant_stats_other(x, fmt, scale, axis, counts, backend)
    if out_dtype is not None:
        y = y.to(out_dtype)
    return (y if out is None else out.copy_(y)), stats


def _fake_quant_stats_other(x: Tensor, fmt: str, scale: float | None, axis: int, counts: bool,
                            backend: str | None) -> tuple[Tensor, dict[str, Tensor]]:
    """fake_quant_stats by Triton (CUDA) or by whole-tensor ops, in x's dtype."""
    if x.numel() and _triton(x, backend):
        from lpq.kernels.formats import Stats

        st = Stats(x.device)
        y = _triton_fake_quant(x, fmt, axis, scale, st)
        out = {"amax": st.amax, "sumsq": st.sumsq[0]}
        if counts:
            out.update(overflow=st.counts[0], flushed=st.counts[1])
            if fmt == "hif8":
                out["coarse"] = st.counts[2]
        return y, out
    y = fake_quant(x, fmt, axis, backend=backend) if scale is None else \
        fake_quant_scaled(x, fmt, scale, axis, backend=backend)
    amax, sumsq = moments(x, backend=backend)
    out = {"amax": amax, "sumsq": sumsq}
    if counts:
        with torch.no_grad():
            xs = x.detach().float()
            if scale is not None:
                xs = xs * torch.tensor(scale, dtype=torch.float32, device=x.device)
            ys = y.detach() if scale is None and x.dtype == torch.float32 else fake_quant(xs, fmt, axis, backend=backend)
            finite = torch.isfinite(xs)
            out.update(overflow=(torch.isinf(ys) & finite).sum(), flushed=((ys == 0) & (xs != 0)).sum())
            if fmt == "hif8":
                out["coarse"] = ((xs.abs() >= 2.0 ** 8) & finite).sum()
    return y, out
