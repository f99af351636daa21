"""Memory-bounded quantized attention: softmax(Q K^T * scaling + mask) V with P quantized, in tiles.

Q, K and V arrive already quantized (their quantizers run on whole tensors, outside). P is never
materialized: scores are recomputed tile by tile (`block_q` query rows x `block_k` keys, all batch
rows and heads at once), so the extra memory is a few tiles plus per-row vectors, whatever the
sequence lengths.

Forward, per call:

1. row pass: the row max m and normalizer l = sum_j exp(S_ij - m) (online: rescaled as the max grows);
2. statistics pass, only when P's scale must be known before P is quantized (current scaling, or
   delayed scaling before its first update): amax and sum of squares of the whole P (in the dtype
   the materialized path quantizes, i.e. the query's), then the quantizer's own scale rule;
3. output pass: P = exp(S - m) / l, cast to the query dtype, quantized with that one scale, times V,
   accumulated in float32. Delayed scaling's pending amax/RMS (training) and `track_stats` are
   gathered here. The same pass accumulates O' = P V with the float P (unquantized), for backward.

Backward (custom autograd, straight-through across P's quantizer as in the materialized path):
O = Pq Vq, so dVq = Pq^T dO and dPq = dO Vq^T counts as dP; the softmax backward is
dS = P * (dP - D) with D_i = sum_j dP_ij P_ij = dO_i . (P Vq)_i = dO_i . O'_i (associativity; NOT
rowsum(dO * O), which would use the quantized P). One tiled pass then recomputes S, P and Pq and
accumulates dQ, dK and dV in float32. The scale P was quantized with in forward is kept for it.

Not supported (the caller falls back to the materialized path, see `unsupported_reason`): dropout
on P (its mask would have to be regenerated tile by tile), a block format quantized along another
axis than the keys, and NVFP4 (its per-tensor scale is part of the format: the tile quantizer
would compute it per tile).

FusedQuantAttention runs the same passes in Triton kernels (lpq.kernels.attention), P in HiF8 or
unquantized; the P quantizer bookkeeping of both is lpq.quant.p_quantization.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lpq.formats import get_format
from lpq.quant.p_quantization import (choose_p_scale, finish_p_quantizer, moments_of_parts, parts_unsupported_reason,
                                      quantize_part)
from lpq.quant.quantizer import TensorQuantizer

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 1024


def unsupported_reason(p_quantizer: TensorQuantizer | None, dropout: float) -> str | None:
    """Why the tiled path cannot compute this call exactly as the materialized one, or None."""
    if dropout > 0:
        return f"dropout on P ({dropout}) is only supported by the materialized path"
    return parts_unsupported_reason(p_quantizer)


def _tile_mask(mask: Tensor | None, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
    """The (..., i0:i1, j0:j1) part of a mask broadcastable to (B, H, Sq, Skv)."""
    if mask is None:
        return None
    rows = slice(None) if mask.shape[-2] == 1 else slice(i0, i1)
    cols = slice(None) if mask.shape[-1] == 1 else slice(j0, j1)
    return mask[..., rows, cols]


class _Problem:
    """One attention call's operands and tiling; computes score and P tiles exactly as the
    materialized path computes the same entries."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                 block_q: int, block_k: int):
        self.q, self.k, self.v = q, k, v
        self.scaling = scaling
        self.sq, self.skv = q.shape[-2], k.shape[-2]
        if mask is None and causal and self.sq > 1:
            self.causal_offset: int | None = self.skv - self.sq   # key j is visible from query i iff j <= i + offset
        else:
            self.causal_offset = None
        if mask is not None and mask.dtype != torch.bool:
            mask = mask[..., :self.skv]
        self.mask = mask
        self.block_q, self.block_k = block_q, block_k

    def tiles_q(self):
        for i0 in range(0, self.sq, self.block_q):
            yield i0, min(i0 + self.block_q, self.sq)

    def tiles_k(self, i0: int, i1: int):
        stop = self.skv
        if self.causal_offset is not None and self.causal_offset >= 0:
            # Keys past the last visible one of this query tile have P = 0 exactly (every row still
            # sees key 0, so no row is fully masked): their tiles contribute nothing and are skipped.
            stop = min(stop, i1 - 1 + self.causal_offset + 1)
        for j0 in range(0, stop, self.block_k):
            yield j0, min(j0 + self.block_k, self.skv)

    def visible(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        """Bool (..., tq, tk) mask of the visible entries of a tile (None: all visible)."""
        if self.causal_offset is not None:
            qi = torch.arange(i0, i1, device=self.q.device)
            kj = torch.arange(j0, j1, device=self.q.device)
            return kj[None, :] <= qi[:, None] + self.causal_offset
        if self.mask is not None and self.mask.dtype == torch.bool:
            return _tile_mask(self.mask, i0, i1, j0, j1)
        return None

    def scores(self, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """float32 scores of a tile: matmul, scaling and mask in the input dtype, as materialized."""
        s = torch.matmul(self.q[..., i0:i1, :], self.k[..., j0:j1, :].transpose(-1, -2)) * self.scaling
        vis = self.visible(i0, i1, j0, j1)
        if vis is not None:
            s = s.masked_fill(~vis, torch.finfo(s.dtype).min)
        elif self.mask is not None:
            s = s + _tile_mask(self.mask, i0, i1, j0, j1)
        return s.float()

    def row_stats(self) -> tuple[Tensor, Tensor]:
        """Row max m and normalizer l = sum_j exp(S_ij - m_i), float32 (B, H, Sq)."""
        shape = self.q.shape[:-1]
        m = torch.full(shape, -math.inf, dtype=torch.float32, device=self.q.device)
        l = torch.zeros(shape, dtype=torch.float32, device=self.q.device)
        for i0, i1 in self.tiles_q():
            mi, li = m[..., i0:i1], l[..., i0:i1]
            for j0, j1 in self.tiles_k(i0, i1):
                s = self.scores(i0, i1, j0, j1)
                m_new = torch.maximum(mi, s.amax(-1))
                # A row that has seen only -inf so far keeps l = 0 (exp(-inf - -inf) would be NaN).
                base = torch.where(torch.isneginf(m_new), 0.0, m_new)
                li.mul_(torch.exp(mi - base)).add_(torch.exp(s - base[..., None]).sum(-1))
                mi.copy_(m_new)
        return m, l

    def probs(self, m: Tensor, l: Tensor, i0: int, i1: int, j0: int, j1: int) -> Tensor:
        """float32 softmax probabilities of a tile (exp(S - m) / l, as softmax computes them)."""
        s = self.scores(i0, i1, j0, j1)
        return torch.exp(s - m[..., i0:i1, None]) / l[..., i0:i1, None]


class TiledQuantAttention(torch.autograd.Function):
    """Forward and backward of quantized attention in tiles; Q, K, V already quantized, K and V
    with Q's number of heads. Returns O in Q's dtype."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                p_quantizer: TensorQuantizer | None, block_q: int, block_k: int) -> Tensor:
        prob = _Problem(q, k, v, mask, scaling, causal, block_q, block_k)
        m, l = prob.row_stats()
        numel = q.shape[:-1].numel() * prob.skv
        pquant, stats = choose_p_scale(p_quantizer, q.device, numel, lambda: _tile_moments(prob, m, l))
        vf = v.float()
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        # O' = P V with the float P, for the softmax backward's row term; only when a gradient is due.
        out_float_p = torch.zeros_like(out) if any(ctx.needs_input_grad[:3]) else None
        for i0, i1 in prob.tiles_q():
            for j0, j1 in prob.tiles_k(i0, i1):
                p = prob.probs(m, l, i0, i1, j0, j1)
                pq = quantize_part(pquant, stats, p.to(q.dtype))
                out[..., i0:i1, :] += pq.float() @ vf[..., j0:j1, :]
                if out_float_p is not None:
                    out_float_p[..., i0:i1, :] += p @ vf[..., j0:j1, :]
        finish_p_quantizer(p_quantizer, pquant, stats, numel)
        ctx.save_for_backward(q, k, v, m, l, out_float_p, mask)
        ctx.settings = (scaling, causal, block_q, block_k, pquant)
        return out.to(q.dtype)

    @staticmethod
    @once_differentiable   # the backward is not itself differentiable: say so instead of a wrong answer
    def backward(ctx, grad_out: Tensor):
        q, k, v, m, l, out_float_p, mask = ctx.saved_tensors
        scaling, causal, block_q, block_k, pquant = ctx.settings
        prob = _Problem(q, k, v, mask, scaling, causal, block_q, block_k)
        go = grad_out.float()
        delta = (go * out_float_p).sum(-1)                       # D_i = sum_j dP_ij P_ij
        qf, kf, vf = q.float(), k.float(), v.float()
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        for i0, i1 in prob.tiles_q():
            go_i, delta_i = go[..., i0:i1, :], delta[..., i0:i1, None]
            for j0, j1 in prob.tiles_k(i0, i1):
                p = prob.probs(m, l, i0, i1, j0, j1)
                pq = pquant(p.to(q.dtype)).float()
                dv[..., j0:j1, :] += pq.transpose(-1, -2) @ go_i
                ds = p * (go_i @ vf[..., j0:j1, :].transpose(-1, -2) - delta_i)
                vis = prob.visible(i0, i1, j0, j1)
                if vis is not None:   # masked_fill passes no gradient to the scores it replaced
                    ds = ds.masked_fill(~vis, 0.0)
                ds = ds * scaling
                dq[..., i0:i1, :] += ds @ kf[..., j0:j1, :]
                dk[..., j0:j1, :] += ds.transpose(-1, -2) @ qf[..., i0:i1, :]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


class FusedQuantAttention(torch.autograd.Function):
    """TiledQuantAttention's computation in Triton kernels (lpq.kernels.attention): P in HiF8 or
    unquantized, Q, K, V already quantized, K and V with Q's number of heads."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                p_quantizer: TensorQuantizer | None, block_q: int, block_k: int) -> Tensor:
        from lpq.kernels.attention import FusedProblem
        from lpq.kernels.formats import Stats

        fp = FusedProblem(q, k, v, mask, scaling, causal, block_q, block_k)
        quant = p_quantizer is not None
        numel = q.shape[:-1].numel() * k.shape[-2]

        def moments_of_p() -> tuple[Tensor, Tensor]:
            first = Stats(q.device)
            fp.forward(quant, None, 1, first, False)
            return first.amax, first.sumsq[0]

        pquant, stats = choose_p_scale(p_quantizer, q.device, numel, moments_of_p)
        kernel_stats = Stats(q.device) if stats is not None else None
        need_grad = any(ctx.needs_input_grad[:3])
        out, out_float_p, m, l = fp.forward(quant, pquant.scale, 2, kernel_stats, need_grad)
        if stats is not None:
            stats.add(kernel_stats.amax, kernel_stats.sumsq[0],
                      dict(zip(("overflow", "flushed", "coarse"), kernel_stats.counts)))
        finish_p_quantizer(p_quantizer, pquant, stats, numel)
        ctx.fused = (fp, quant, pquant.scale)
        ctx.save_for_backward(out_float_p, m, l)
        return out.reshape(q.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        fp, quant, scale = ctx.fused
        out_float_p, m, l = ctx.saved_tensors
        dq, dk, dv = fp.backward(grad_out, out_float_p, m, l, quant, scale)
        return dq, dk, dv, None, None, None, None, None, None


def fused_unsupported_reason(q: Tensor, p_quantizer: TensorQuantizer | None) -> str | None:
    """Why the fused Triton kernels cannot compute this call (beyond unsupported_reason), or None."""
    from lpq import kernels

    why = kernels.why_unavailable(q.device)
    if why is not None:
        return why
    if p_quantizer is not None and p_quantizer.spec.format != "hif8":
        return f"the fused kernels quantize P in hif8 only, not {p_quantizer.spec.format}"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the fused kernels take float32, bfloat16 or float16, not {q.dtype}"
    return None


def _tile_moments(prob: _Problem, m: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """amax and float64 sum of squares of the whole P (in the query dtype), tile by tile."""
    tiles = (prob.probs(m, l, i0, i1, j0, j1).to(prob.q.dtype)
             for i0, i1 in prob.tiles_q() for j0, j1 in prob.tiles_k(i0, i1))
    return moments_of_parts(tiles, prob.q.device)


def tiled_quantized_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                              p_quantizer: TensorQuantizer | None, block_q: int = DEFAULT_BLOCK_Q,
                              block_k: int = DEFAULT_BLOCK_K) -> Tensor:
    """softmax(q k^T * scaling + mask) v with P quantized by `p_quantizer`, in (block_q x block_k)
    tiles. q, k, v: (B, H, S, D), already quantized, k and v with q's heads; `block_k` goes
    through key_tile."""
    if block_q < 1 or block_k < 1:
        raise ValueError(f"attention tile sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    return TiledQuantAttention.apply(q, k, v, mask, scaling, causal, p_quantizer, block_q,
                                     key_tile(block_k, p_quantizer))


def fused_quantized_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                              p_quantizer: TensorQuantizer | None, block_q: int = 64, block_k: int = 64) -> Tensor:
    """tiled_quantized_attention in fused Triton kernels (see fused_unsupported_reason); block_q and
    block_k are the kernels' tile sizes (powers of two >= 16)."""
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"fused attention {name} must be a power of two >= 16, got {b}")
    why = fused_unsupported_reason(q, p_quantizer)
    if why is not None:
        raise NotImplementedError(f"fused quantized attention: {why}")
    return FusedQuantAttention.apply(q, k, v, mask, scaling, causal, p_quantizer, block_q, block_k)


def key_tile(block_k: int, p_quantizer: TensorQuantizer | None) -> int:
    """`block_k` rounded up to a multiple of P's format block, so that key tiles hold whole blocks."""
    fmt_block = get_format(p_quantizer.spec.format).block if p_quantizer is not None else 1
    return -(-block_k // fmt_block) * fmt_block
