"""Exact HiF4 codes for values already on the HiF4 grid but with non-standard block metadata.

GPTQ with scale search picks a block's E6M2 scale S and E1 bits to minimize error, so its output
is on the HiF4 grid while re-encoding it with the standard rule (scale from the block max) often
lands elsewhere: HiF4 fake quantization is not idempotent. The metadata that encodes such values
exactly is found by `lpq.formats.hif4.blocks_on_grid`. Layout of the result: docs/design.md,
bit-order version 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lpq.formats import Packed
from lpq.formats.hif4 import BLOCK, blocks_on_grid


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
    meta = blocks_on_grid(x2d.double().abs().reshape(-1, BLOCK))
    if meta is None:
        return None
    code, e8, e16, k = (m.reshape(rows, Lp // BLOCK, -1) for m in meta)
    nib = (torch.signbit(x2d).long() << 3) | k.reshape(rows, Lp)
    pairs = nib.reshape(rows, Lp // 2, 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    scales = torch.cat([code, _bits_to_bytes(e8), _bits_to_bytes(e16)], -1)
    return Packed(fmt, tuple(x.shape), axis, codes, scales, None)
