"""The reference path of quantized attention: P held in memory, gradients by autograd.

softmax(Q K^T * scaling + mask) V with P quantized. Q, K and V arrive already quantized; K and V
may have fewer heads than Q (grouped-query attention): the query heads that share a key head are
stacked along the rows of one matmul, so K and V are never repeated.

A causal call without a mask computes P in chunks of `rows` query rows, each only up to its last
visible key (rounded up to whole format blocks of P): the later keys have P = 0 exactly, so about
half of the score, softmax and matmul work of a long sequence is skipped (as sdpa's causal kernels
skip it). The chunks are quantized with one scale for the whole P and their statistics summed
(lpq.quant.p_quantization), so every P decision is the one the whole P would get; against one
whole-P computation only the rounding of sums changes (rows and key sums end at the last visible
key, dK and dV add the chunks' parts). Measured on SmolLM2-135M's attention (9 query and 3 key
heads, HiF8 with delayed scaling; forward and backward, one CPU thread): at 1 x 512 tokens 64-row
chunks 29-30 ms, the whole P 52 ms, sdpa 31 ms; at 2 x 128 tokens 6.1-6.5, 7.5 and 4.5 ms.

Calls whose P quantizer cannot work on parts (p_quantization.parts_unsupported_reason: NVFP4's
per-tensor scale, a block format along another axis, several scale groups) and every call with a
mask or without causality compute the whole P in one piece, quantized by the P quantizer itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lpq.formats import get_format
from lpq.quant.p_quantization import (choose_p_scale, finish_p_quantizer, moments_of_parts, parts_unsupported_reason,
                                      quantize_part)
from lpq.quant.quantizer import TensorQuantizer

# Measured at 512 tokens: 64 and 128 rows alike, 256 12 % and 512 (one chunk) 75 % slower; at 128 tokens 64 best.
DEFAULT_CAUSAL_ROWS = 64


def materialized_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                           p_quantizer: TensorQuantizer | None, dropout: float = 0.0, training: bool = False,
                           rows: int = DEFAULT_CAUSAL_ROWS) -> Tensor:
    """q: (B, H, Sq, D); k, v: (B, Hkv, Skv, D) with H a multiple of Hkv, all already quantized;
    mask: bool (True = visible) or additive, broadcastable to (B, H, Sq, Skv). Returns (B, H, Sq, D)."""
    if rows < 1:
        raise ValueError(f"causal chunk rows must be >= 1, got {rows}")
    sq, skv = q.shape[-2], k.shape[-2]
    offset = skv - sq          # key j is visible from query i iff j <= i + offset
    if mask is None and causal and sq > 1 and offset >= 0 and parts_unsupported_reason(p_quantizer) is None:
        return _causal_chunks(q, k, v, scaling, p_quantizer, dropout, training, rows, offset)
    scores = _grouped_matmul(q, k.transpose(-1, -2)) * scaling
    if mask is None and causal and sq > 1:
        mask = torch.ones(sq, skv, dtype=torch.bool, device=scores.device).tril(diagonal=offset)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask[..., :skv]
    p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    p = F.dropout(p, p=dropout, training=training)
    if p_quantizer is not None:
        p = p_quantizer(p)
    return _grouped_matmul(p, v)


def _causal_chunks(q: Tensor, k: Tensor, v: Tensor, scaling: float, p_quantizer: TensorQuantizer | None,
                   dropout: float, training: bool, rows: int, offset: int) -> Tensor:
    sq, skv = q.shape[-2], k.shape[-2]
    block = get_format(p_quantizer.spec.format).block if p_quantizer is not None else 1
    probs = []
    for i0 in range(0, sq, rows):
        i1 = min(i0 + rows, sq)
        stop = min(skv, -(-(i1 + offset) // block) * block)   # past the last visible key, whole blocks
        scores = _grouped_matmul(q[..., i0:i1, :], k[..., :stop, :].transpose(-1, -2)) * scaling
        visible = torch.arange(stop, device=q.device) <= torch.arange(i0, i1, device=q.device)[:, None] + offset
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
        p = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs.append(F.dropout(p, p=dropout, training=training))
    numel = q.shape[:-1].numel() * skv
    pquant, stats = choose_p_scale(p_quantizer, q.device, numel, lambda: moments_of_parts(probs, q.device))
    out = [_grouped_matmul(quantize_part(pquant, stats, p), v[..., :p.shape[-1], :]) for p in probs]
    finish_p_quantizer(p_quantizer, pquant, stats, numel)
    return torch.cat(out, dim=-2)


def _grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (B, H, M, X) @ b (B, Hkv, X, N) -> (B, H, M, N), query head h using head h // (H / Hkv) of
    b (repeat_interleave's pairing): the heads sharing a head of b are the rows of one matmul."""
    bsz, heads, m, x = a.shape
    kv_heads = b.shape[1]
    out = torch.matmul(a.reshape(bsz, kv_heads, heads // kv_heads * m, x), b)
    return out.view(bsz, heads, m, b.shape[-1])
