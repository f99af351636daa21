"""Exact HiF4 codes for values already on the HiF4 grid but with non-standard block metadata.

GPTQ with scale search picks a block's E6M2 scale S and E1 bits to minimize error, so its output
is on the HiF4 grid while re-encoding it with the standard rule (scale from the block max) often
lands elsewhere: HiF4 fake quantization is not idempotent. Here, per 64-block, the candidate
scales are S = amax * 4 / (k * 2^d) (the block max is some k/4 * 2^d * S, k = 1..7, d = 0..2);
a candidate works when every element is (k/4) * 2^d * S with d = E1_8 + E1_16 shared as the
format shares them. Layout of the result: docs/design.md, bit-order version 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lpq.formats import Packed
from lpq.formats.hif4 import BLOCK, S_MAX, S_MIN, scale_code, scale_value


def _e6m2_code(s: Tensor) -> tuple[Tensor, Tensor]:
    """(code, exact) for float64 s: the E6M2 code nearest s, and whether it represents s exactly."""
    inside = (s >= S_MIN) & (s <= S_MAX)
    code = scale_code(torch.where(inside, s, torch.ones_like(s)).float())
    return code, inside & (scale_value(code).double() == s)


def _hif4_blocks(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """For |values| a (n, 64) float64: (scale code (n,), E1_8 (n, 8), E1_16 (n, 16), k (n, 64)), or None."""
    n = a.shape[0]
    code = torch.zeros(n, dtype=torch.uint8)
    e8 = torch.zeros(n, 8, dtype=torch.int64)
    e16 = torch.zeros(n, 16, dtype=torch.int64)
    k_out = torch.zeros(n, BLOCK, dtype=torch.int64)
    todo = (a.amax(-1) > 0).nonzero().flatten()      # all-zero blocks: scale code 0, all k = 0
    pow2 = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    for k_max in range(7, 0, -1):
        for d_max in range(3):
            if todo.numel() == 0:
                return code, e8, e16, k_out
            at = a[todo]
            c, exact = _e6m2_code(at.amax(-1) * 4 / (k_max * 2 ** d_max))
            S = scale_value(c).double()
            # t[:, i, d]: element i in units of S * 2^d / 4; it fits when t is an integer <= 7
            t = at.unsqueeze(-1) * 4 / (S[:, None, None] * pow2)
            fits = (t == torch.round(t)) & (t <= 7)
            ok4 = fits.reshape(-1, 16, 4, 3).all(-2)                                 # (m, 16, d)
            by_e8 = torch.stack([ok4[..., 0] | ok4[..., 1], ok4[..., 1] | ok4[..., 2]], -1)
            ok8 = by_e8.reshape(-1, 8, 2, 2).all(-2)                                 # (m, 8, E1_8)
            b8 = (~ok8[..., 0]).long()                                               # prefer E1_8 = 0
            b16 = (~ok4.gather(-1, b8.repeat_interleave(2, -1).unsqueeze(-1)).squeeze(-1)).long()
            d = b8.repeat_interleave(8, -1) + b16.repeat_interleave(4, -1)
            done = exact & ok8.any(-1).all(-1)
            rows = todo[done]
            code[rows] = c[done]
            e8[rows] = b8[done]
            e16[rows] = b16[done]
            k_out[rows] = torch.round(t[done].gather(-1, d[done].unsqueeze(-1)).squeeze(-1)).long()
            todo = todo[~done]
    return (code, e8, e16, k_out) if todo.numel() == 0 else None


def _bits_to_bytes(bits: Tensor) -> Tensor:
    """(..., 8n) bits -> (..., n) bytes, bit i of byte j from element 8j + i."""
    w = 1 << torch.arange(8, dtype=torch.int64)
    return (bits.reshape(*bits.shape[:-1], -1, 8) * w).sum(-1).to(torch.uint8)


def encode_on_grid(x: Tensor, fmt: str, axis: int = -1) -> Packed | None:
    """Packed bits that decode to exactly `x` (float32), or None when this needs no search (formats
    other than HiF4 re-encode their own grid exactly) or no HiF4 encoding of `x` exists."""
    if fmt != "hif4" or not bool(torch.isfinite(x).all()):
        return None
    axis = axis % max(x.dim(), 1)
    x2d = x.float().movedim(axis, -1).reshape(-1, x.shape[axis]).contiguous()
    rows, L = x2d.shape
    Lp = -(-L // BLOCK) * BLOCK
    x2d = torch.nn.functional.pad(x2d, (0, Lp - L))
    meta = _hif4_blocks(x2d.double().abs().reshape(-1, BLOCK))
    if meta is None:
        return None
    code, e8, e16, k = (m.reshape(rows, Lp // BLOCK, -1) for m in meta)
    nib = (torch.signbit(x2d).long() << 3) | k.reshape(rows, Lp)
    pairs = nib.reshape(rows, Lp // 2, 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    scales = torch.cat([code, _bits_to_bytes(e8), _bits_to_bytes(e16)], -1)
    return Packed(fmt, tuple(x.shape), axis, codes, scales, None)
