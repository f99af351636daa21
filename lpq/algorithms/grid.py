"""Format grids with explicit, per-element scales: what GPTQ and scale search need from a format.

A block format is "element grid x block scale". The algorithms must be able to (1) choose the scales
of a block by the format's own rule, (2) choose them differently (scale search), and (3) round one
column at a time onto *fixed* scales (GPTQ). So the scales are materialized per element:

    ElemScale.scale[r, i]  the value one element unit stands for (HiF4: S * 2^d_i; MX: 2^e)
    ElemScale.recip[r, i]  the multiplier the format uses to go to element units (HiF4: bf16(1/S) / 2^d_i)

`quantize(x, es, fmt)` then rounds elementwise and is exact to the format (formats.md 2.2, 3.3); with
`default_scales` it reproduces `lpq.formats.fake_quant` bit for bit (tests check this).
All tensors here are float32 2-D (rows, L) with L a multiple of the block.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

BLOCK = {"hif4": 64, "mxfp4": 32, "mxfp4-rceil": 32}
_HIF4_C = 0.142578125          # bf16(1/7): the toolkit's multiplier for the raw scale
_E6M2_MIN, _E6M2_MAX = 2.0 ** -48, 49152.0


class ElemScale(NamedTuple):
    scale: Tensor   # (rows, L)
    recip: Tensor   # (rows, L)


def check_format(fmt: str) -> int:
    if fmt not in BLOCK:
        raise ValueError(f"format {fmt!r} has no grid for the PTQ algorithms; use one of {', '.join(BLOCK)}")
    return BLOCK[fmt]


def _bf16(x: Tensor) -> Tensor:
    return x.to(torch.bfloat16).float()


def _blocks(x: Tensor, size: int) -> Tensor:
    rows, L = x.shape
    if L % size:
        raise ValueError(f"length {L} is not a multiple of the block {size}; pad first")
    return x.view(rows, L // size, size)


# ---------------------------------------------------------------- element rounding

def quantize(x: Tensor, es: ElemScale, fmt: str) -> Tensor:
    """Round x onto the format's element grid with fixed per-element scales (same shape as x)."""
    t = x.abs() * es.recip
    if fmt == "hif4":
        # S1P2 magnitudes k/4, k = 0..7, half away from zero; the +0.5 is exact in float64 (CUDA semantics).
        k = torch.floor(t.double() * 4 + 0.5).clamp_(max=7).float()
        return torch.copysign(k * 0.25 * es.scale, x)
    # E2M1 with RNE and saturation at 6 (step 0.5 below 2, 1 below 4, 2 up to 6).
    t = t.clamp(max=6.0)
    step = torch.where(t < 2, 0.5, torch.where(t < 4, 1.0, 2.0))
    q = torch.round(t / step) * step
    return torch.copysign(q * es.scale, x)


# ---------------------------------------------------------------- HiF4 scales

def _e6m2_round(s0: Tensor) -> Tensor:
    """RNE of a positive float32 onto the E6M2 grid (a carry into the next binade is allowed)."""
    e = torch.floor(torch.log2(s0))
    # log2 can misjudge the binade by one ulp near powers of two; fix it exactly.
    p = torch.pow(2.0, e)
    e = torch.where(s0 < p, e - 1, torch.where(s0 >= 2 * p, e + 1, e))
    p = torch.pow(2.0, e)
    return torch.round(s0 / p * 4) * p / 4


def _e6m2_neighbour(s: Tensor, steps: int) -> Tensor:
    """The E6M2 value `steps` grid points above (steps > 0) or below s, clamped to the E6M2 range."""
    e = torch.floor(torch.log2(s))
    m = torch.round(s / torch.pow(2.0, e) * 4) - 4 + steps       # mantissa index 0..3, may leave the binade
    e = e + torch.floor(m / 4)
    m = torch.remainder(m, 4)
    return (torch.pow(2.0, e) * (1 + m / 4)).clamp(_E6M2_MIN, _E6M2_MAX)


def _hif4_elem(S: Tensor, d: Tensor) -> ElemScale:
    """S (rows, nb) and d (rows, nb, 64) -> per-element scales."""
    R = _bf16(1.0 / S)
    pw = torch.pow(2.0, d)
    scale = (S.unsqueeze(-1) * pw).flatten(1)
    recip = (R.unsqueeze(-1) / pw).flatten(1)
    return ElemScale(scale, recip)


def hif4_default_meta(x: Tensor) -> tuple[Tensor, Tensor]:
    """The toolkit's choice: S (rows, nb) and d (rows, nb, 64) = E1_8 + E1_16 per element."""
    xb = _blocks(x.abs(), 64)
    A = xb.amax(-1)
    S = _e6m2_round(_bf16(A * _HIF4_C).clamp(_E6M2_MIN, _E6M2_MAX))
    R = _bf16(1.0 / S).unsqueeze(-1)
    B = xb.view(*xb.shape[:2], 8, 8).amax(-1)
    C = xb.view(*xb.shape[:2], 16, 4).amax(-1)
    e8 = (B * R >= 4).float()
    e16 = ((C * R) / torch.pow(2.0, e8.repeat_interleave(2, -1)) >= 2).float()
    d = e8.repeat_interleave(8, -1) + e16.repeat_interleave(4, -1)
    return S, d


def _hif4_best_d(xb: Tensor, S: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """For a fixed S per block, the micro-exponents minimizing the w-weighted squared error.

    The choice separates: per 4-group pick E1_16 given E1_8, per 8-group pick E1_8. Returns
    (d per element (rows, nb, 64), error per block (rows, nb)).
    """
    rows, nb, _ = xb.shape
    errs = []
    for dd in range(3):
        d = torch.full_like(xb, float(dd))
        es = _hif4_elem(S, d)
        q = quantize(xb.reshape(rows, -1), es, "hif4").view_as(xb)
        errs.append(((q - xb) ** 2 * w).view(rows, nb, 16, 4).sum(-1))
    e4 = torch.stack(errs)                                        # (3, rows, nb, 16)
    best0, arg0 = torch.minimum(e4[0], e4[1]), (e4[1] < e4[0]).float()     # E1_8 = 0: d in {0, 1}
    best1, arg1 = torch.minimum(e4[1], e4[2]), (e4[2] < e4[1]).float()     # E1_8 = 1: d in {1, 2}
    g0 = best0.view(rows, nb, 8, 2).sum(-1)
    g1 = best1.view(rows, nb, 8, 2).sum(-1)
    e8 = (g1 < g0).float()                                        # (rows, nb, 8)
    e8_4 = e8.repeat_interleave(2, -1)
    e16 = torch.where(e8_4 > 0, arg1, arg0)
    d = e8.repeat_interleave(8, -1) + e16.repeat_interleave(4, -1)
    return d, torch.minimum(g0, g1).sum(-1)


def hif4_search_meta(x: Tensor, weight: Tensor | None = None, steps: tuple[int, ...] = (-2, -1, 0, 1)
                     ) -> tuple[Tensor, Tensor]:
    """HiF4 scale search: E6M2 scale among grid neighbours of the default, best micro-exponents for each.

    weight: per-column importance (L,) such as diag(H); the error minimized is sum w_i (x_i - q_i)^2.
    """
    rows, L = x.shape
    xb = _blocks(x, 64)
    w = (torch.ones(L) if weight is None else weight.float()).view(1, L // 64, 64)
    S0, _ = hif4_default_meta(x)
    best_err, best_S, best_d = None, None, None
    for st in steps:
        S = S0 if st == 0 else _e6m2_neighbour(S0, st)
        d, err = _hif4_best_d(xb, S, w)
        if best_err is None:
            best_err, best_S, best_d = err, S, d
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_S = torch.where(better, S, best_S)
        best_d = torch.where(better.unsqueeze(-1), d, best_d)
    return best_S, best_d


# ---------------------------------------------------------------- MX scales

def mx_default_exponent(x: Tensor, fmt: str) -> Tensor:
    """Shared exponent per 32-block (rows, nb): OCP floor rule or RCEIL."""
    amax = _blocks(x.abs(), 32).amax(-1)
    if fmt == "mxfp4-rceil":
        e = torch.ceil(torch.log2(amax * torch.tensor(1 / 6, dtype=torch.float32)))
    else:
        _, p = torch.frexp(amax)                  # amax = m 2^p, m in [0.5, 1): floor(log2 amax) = p - 1
        e = (p - 1 - 2).float()
    return torch.where(amax > 0, e, torch.full_like(e, -127.0)).clamp(-127, 127)


def _mx_elem(e: Tensor) -> ElemScale:
    scale = torch.pow(2.0, e).repeat_interleave(32, -1)
    return ElemScale(scale, 1.0 / scale)


def mx_search_exponent(x: Tensor, fmt: str, weight: Tensor | None = None, steps: tuple[int, ...] = (0, 1)
                       ) -> Tensor:
    """Per 32-block, the shared exponent among floor-rule + steps minimizing the w-weighted error."""
    rows, L = x.shape
    w = (torch.ones(L) if weight is None else weight.float()).view(1, L)
    e0 = mx_default_exponent(x, "mxfp4")
    best_err, best_e = None, None
    for st in steps:
        e = (e0 + st).clamp(-127, 127)
        q = quantize(x, _mx_elem(e), fmt)
        err = ((q - x) ** 2 * w).view(rows, L // 32, 32).sum(-1)
        if best_err is None:
            best_err, best_e = err, e
        else:
            better = err < best_err
            best_err, best_e = torch.where(better, err, best_err), torch.where(better, e, best_e)
    return best_e


# ---------------------------------------------------------------- entry points

def default_scales(x: Tensor, fmt: str) -> ElemScale:
    """The format's own scale rule, materialized per element."""
    check_format(fmt)
    if fmt == "hif4":
        return _hif4_elem(*hif4_default_meta(x))
    return _mx_elem(mx_default_exponent(x, fmt))


def search_scales(x: Tensor, fmt: str, weight: Tensor | None = None) -> ElemScale:
    """Scales chosen to minimize the (weighted) squared error instead of by the format's max rule."""
    check_format(fmt)
    if fmt == "hif4":
        return _hif4_elem(*hif4_search_meta(x, weight))
    return _mx_elem(mx_search_exponent(x, fmt, weight))


def pad_to_block(x: Tensor, block: int) -> Tensor:
    L = x.shape[-1]
    Lp = -(-L // block) * block
    return x if Lp == L else torch.nn.functional.pad(x, (0, Lp - L))


def fake_quant(x: Tensor, fmt: str, search: bool = False, weight: Tensor | None = None) -> Tensor:
    """Quantize-dequantize along the last dim of any-shaped x (float32 math, x's dtype back)."""
    block = check_format(fmt)
    shape, L = x.shape, x.shape[-1]
    x2 = pad_to_block(x.reshape(-1, L).float(), block)
    if weight is not None:
        weight = pad_to_block(weight.float().view(1, -1), block).view(-1)
    es = search_scales(x2, fmt, weight) if search else default_scales(x2, fmt)
    return quantize(x2, es, fmt)[:, :L].reshape(shape).to(x.dtype)
