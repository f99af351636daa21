"""Fused quantized attention in Triton: the tiled path of lpq.quant.tiled_attention in three kernels.

Same meaning and the same passes as the PyTorch tiled path (see its docstring): per (batch x head,
query block) program, a row pass (max m, normalizer l), then either a statistics pass over P or the
output pass (P = exp(S - m) / l, rounded to the operands' dtype, HiF8 fake quantization with one
scale, O += Pq V and O' += P V); backward recomputes tiles in a dK/dV kernel (per key block) and
a dQ kernel (per query block), with D_i = dO_i . O'_i. P is quantized in HiF8 or not at all (other
formats take the PyTorch tiled path). Statistics (amax, float64 sum of squares, overflow / flushed
/ coarse counts) use the same device helpers as the fake-quant kernels.

Exactness terms are those of the tiled path: the float P differs from the materialized softmax by
rounding (exp here is Triton's, sums run in another order), and a quantized-P decision may differ
only where P does. Products of the operands are exact and accumulate in float32 (`ieee` dots for
float32 operands, never TF32).

Operands: q (BH, Sq, D), k and v (BH, Skv, D), contiguous, one dtype (float32, bfloat16 or float16);
the mask is a bool or additive tensor broadcastable to (B, H, Sq, Skv) (strides 0 where it
broadcasts), or the internal causal rule (key j visible from query i iff j <= i + offset).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lpq.kernels import interpreted
from lpq.kernels.formats import _IO, IO_BF16, Stats, _bf16_round, _hif8_bits, _load, _stats, _store

MASK_NONE, MASK_BOOL, MASK_ADD, MASK_ADD_ROUNDED = 0, 1, 2, 3


@triton.jit
def _round_io(x, IO: tl.constexpr):
    """float32 x rounded to the operands' dtype (and back to float32)."""
    if IO == 1:
        return _bf16_round(x)
    elif IO == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _dot(a, b, IO: tl.constexpr, F32_DOT: tl.constexpr):
    """a @ b with float32 accumulation; a, b float32 holding values exact in the operands' dtype."""
    if F32_DOT or IO == 0:
        return tl.dot(a, b, input_precision="ieee")
    elif IO == 1:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _scores(q, k_ptr, kv_off, j0, Skv, D, stride_ks, mask_ptr, b, h, rows, sm_b, sm_h, sm_q, sm_k,
            scaling, fill, causal_offset, IO: tl.constexpr, F32_DOT: tl.constexpr, MASK: tl.constexpr,
            CAUSAL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """(BM, BN) float32 scores of the key block at j0 and its validity (in range and visible)."""
    cols = j0 + tl.arange(0, BN)
    d = tl.arange(0, BD)
    col_ok = cols < Skv
    k = _load(k_ptr, kv_off + cols[:, None] * stride_ks + d[None, :], col_ok[:, None] & (d[None, :] < D), IO)
    # as the materialized path: the product and the scaling rounded to the operands' dtype
    s = _round_io(_round_io(_dot(q, tl.trans(k), IO, F32_DOT), IO) * scaling, IO)
    row_ok = rows >= 0                                       # -1 marks a padding row
    vis = col_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        vis = vis & (cols[None, :] <= rows[:, None] + causal_offset)
        s = tl.where(cols[None, :] <= rows[:, None] + causal_offset, s, fill)
    if MASK == 1:
        mv = tl.load(mask_ptr + b * sm_b + h * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k,
                     mask=row_ok[:, None] & col_ok[None, :], other=1)
        vis = vis & (mv != 0)
        s = tl.where(mv != 0, s, fill)
    if MASK == 2 or MASK == 3:   # 3: a mask of the operands' dtype, whose sum is rounded to it
        s = s + tl.load(mask_ptr + b * sm_b + h * sm_h + rows[:, None] * sm_q + cols[None, :] * sm_k,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if MASK == 3:
            s = _round_io(s, IO)
    s = tl.where(col_ok[None, :], s, float("-inf"))        # keys past the end do not exist
    return s, vis, col_ok


@triton.jit
def _probs(s, m, l, col_ok):
    base = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.div_rn(tl.exp(s - base[:, None]), l[:, None])
    return tl.where(col_ok[None, :], p, 0.0)


@triton.jit
def _quantize_p(pc, scale, QUANT: tl.constexpr, SCALED: tl.constexpr):
    """(ys, pq): HiF8 of pc * scale, and ys / scale (pc when P is not quantized)."""
    if QUANT:
        xs = pc * scale if SCALED else pc
        ys = _hif8_bits(xs).to(tl.float32, bitcast=True)
        pq = tl.math.div_rn(ys, scale) if SCALED else ys
        return xs, ys, pq
    else:
        return pc, pc, pc


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, op_ptr, m_ptr, l_ptr, mask_ptr, amax_ptr, sumsq_ptr, count_ptr,
                H, Sq, Skv, D, sm_b, sm_h, sm_q, sm_k, scaling, fill, causal_offset, scale,
                IO: tl.constexpr, F32_DOT: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                QUANT: tl.constexpr, SCALED: tl.constexpr, PHASE: tl.constexpr, STATS: tl.constexpr,
                WITH_OP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    # PHASE 1: statistics of P only; PHASE 2: outputs (and statistics if STATS)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < Sq
    d = tl.arange(0, BD)
    q_off = bh * Sq * D
    kv_off = bh * Skv * D
    q = _load(q_ptr, q_off + rows[:, None] * D + d[None, :], row_ok[:, None] & (d[None, :] < D), IO)
    rows_m = tl.where(row_ok, rows, -1)                    # padding rows: nothing visible, never stored
    stop = Skv
    if CAUSAL:
        if causal_offset >= 0:                             # tiles past the diagonal hold P = 0 exactly
            stop = tl.minimum(Skv, (tl.program_id(0) + 1) * BM + causal_offset)
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    for j0 in range(0, stop, BN):
        s, vis, col_ok = _scores(q, k_ptr, kv_off, j0, Skv, D, D, mask_ptr, b, h, rows_m, sm_b, sm_h, sm_q, sm_k,
                                 scaling, fill, causal_offset, IO, F32_DOT, MASK, CAUSAL, BN, BD)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - base) + tl.sum(tl.exp(s - base[:, None]), axis=1)
        m = m_new
    acc = tl.zeros((BM, BD), tl.float32)
    acc_p = tl.zeros((BM, BD), tl.float32)
    for j0 in range(0, stop, BN):
        s, vis, col_ok = _scores(q, k_ptr, kv_off, j0, Skv, D, D, mask_ptr, b, h, rows_m, sm_b, sm_h, sm_q, sm_k,
                                 scaling, fill, causal_offset, IO, F32_DOT, MASK, CAUSAL, BN, BD)
        p = _probs(s, m, l, col_ok)
        pc = _round_io(p, IO)
        xs, ys, pq = _quantize_p(pc, scale, QUANT, SCALED)
        valid = row_ok[:, None] & col_ok[None, :]
        if STATS:
            _stats(pc, xs, ys, valid, amax_ptr, sumsq_ptr, count_ptr, QUANT)
        if PHASE == 2:
            cols = j0 + tl.arange(0, BN)
            v = _load(v_ptr, kv_off + cols[:, None] * D + d[None, :], col_ok[:, None] & (d[None, :] < D), IO)
            acc += _dot(tl.where(valid, pq, 0.0), v, IO, F32_DOT)
            if WITH_OP:
                acc_p += tl.dot(tl.where(valid, p, 0.0), v, input_precision="ieee")
    if PHASE == 2:
        out_mask = row_ok[:, None] & (d[None, :] < D)
        _store(o_ptr, q_off + rows[:, None] * D + d[None, :], acc, out_mask, IO)
        if WITH_OP:
            tl.store(op_ptr + q_off + rows[:, None] * D + d[None, :], acc_p, mask=out_mask)
        tl.store(m_ptr + bh * Sq + rows, m, mask=row_ok)
        tl.store(l_ptr + bh * Sq + rows, l, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, m_ptr, l_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr,
                     H, Sq, Skv, D, sm_b, sm_h, sm_q, sm_k, scaling, fill, causal_offset, scale,
                     IO: tl.constexpr, F32_DOT: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                     QUANT: tl.constexpr, SCALED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    j0 = tl.program_id(0) * BN
    cols = j0 + tl.arange(0, BN)
    d = tl.arange(0, BD)
    col_ok = cols < Skv
    q_off = bh * Sq * D
    kv_off = bh * Skv * D
    kv_mask = col_ok[:, None] & (d[None, :] < D)
    v = _load(v_ptr, kv_off + cols[:, None] * D + d[None, :], kv_mask, IO)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    start = 0
    if CAUSAL:
        if causal_offset >= 0:      # query blocks wholly before this key block see none of it
            start = tl.maximum(j0 - causal_offset, 0) // BM * BM
    for i0 in range(start, Sq, BM):
        rows = i0 + tl.arange(0, BM)
        row_ok = rows < Sq
        qm = row_ok[:, None] & (d[None, :] < D)
        q = _load(q_ptr, q_off + rows[:, None] * D + d[None, :], qm, IO)
        do = tl.load(do_ptr + q_off + rows[:, None] * D + d[None, :], mask=qm, other=0.0)
        m = tl.load(m_ptr + bh * Sq + rows, mask=row_ok, other=0.0)
        l = tl.load(l_ptr + bh * Sq + rows, mask=row_ok, other=1.0)
        delta = tl.load(delta_ptr + bh * Sq + rows, mask=row_ok, other=0.0)
        s, vis, _ = _scores(q, k_ptr, kv_off, j0, Skv, D, D, mask_ptr, b, h, tl.where(row_ok, rows, -1),
                            sm_b, sm_h, sm_q, sm_k, scaling, fill, causal_offset, IO, F32_DOT, MASK, CAUSAL, BN, BD)
        valid = row_ok[:, None] & col_ok[None, :]
        p = tl.where(valid, _probs(s, m, l, col_ok), 0.0)
        _, _, pq = _quantize_p(_round_io(p, IO), scale, QUANT, SCALED)
        dv += tl.dot(tl.trans(pq), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        if MASK == 1 or CAUSAL:    # masked_fill passes no gradient to the scores it replaced
            ds = tl.where(vis, ds, 0.0)
        dk += tl.dot(tl.trans(ds * scaling), q, input_precision="ieee")
    tl.store(dk_ptr + kv_off + cols[:, None] * D + d[None, :], dk, mask=kv_mask)
    tl.store(dv_ptr + kv_off + cols[:, None] * D + d[None, :], dv, mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, m_ptr, l_ptr, delta_ptr, dq_ptr, mask_ptr,
                   H, Sq, Skv, D, sm_b, sm_h, sm_q, sm_k, scaling, fill, causal_offset,
                   IO: tl.constexpr, F32_DOT: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < Sq
    d = tl.arange(0, BD)
    q_off = bh * Sq * D
    kv_off = bh * Skv * D
    qm = row_ok[:, None] & (d[None, :] < D)
    q = _load(q_ptr, q_off + rows[:, None] * D + d[None, :], qm, IO)
    do = tl.load(do_ptr + q_off + rows[:, None] * D + d[None, :], mask=qm, other=0.0)
    m = tl.load(m_ptr + bh * Sq + rows, mask=row_ok, other=0.0)
    l = tl.load(l_ptr + bh * Sq + rows, mask=row_ok, other=1.0)
    delta = tl.load(delta_ptr + bh * Sq + rows, mask=row_ok, other=0.0)
    dq = tl.zeros((BM, BD), tl.float32)
    stop = Skv
    if CAUSAL:
        if causal_offset >= 0:
            stop = tl.minimum(Skv, (tl.program_id(0) + 1) * BM + causal_offset)
    for j0 in range(0, stop, BN):
        cols = j0 + tl.arange(0, BN)
        s, vis, col_ok = _scores(q, k_ptr, kv_off, j0, Skv, D, D, mask_ptr, b, h, tl.where(row_ok, rows, -1),
                                 sm_b, sm_h, sm_q, sm_k, scaling, fill, causal_offset, IO, F32_DOT, MASK, CAUSAL,
                                 BN, BD)
        valid = row_ok[:, None] & col_ok[None, :]
        p = tl.where(valid, _probs(s, m, l, col_ok), 0.0)
        kvm = col_ok[:, None] & (d[None, :] < D)
        v = _load(v_ptr, kv_off + cols[:, None] * D + d[None, :], kvm, IO)
        k = _load(k_ptr, kv_off + cols[:, None] * D + d[None, :], kvm, IO)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        if MASK == 1 or CAUSAL:
            ds = tl.where(vis, ds, 0.0)
        dq += tl.dot(ds * scaling, k, input_precision="ieee")
    tl.store(dq_ptr + q_off + rows[:, None] * D + d[None, :], dq, mask=qm)


# ---------------------------------------------------------------- host side

class FusedProblem:
    """Launch settings shared by the forward and backward kernels of one attention call."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, causal: bool,
                 block_q: int, block_k: int):
        if q.dtype not in _IO or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"fused attention takes one of {list(_IO)} for q, k and v, got {q.dtype}, "
                            f"{k.dtype}, {v.dtype}")
        self.B, self.H, self.sq, self.d = q.shape
        self.skv = k.shape[-2]
        self.q, self.k, self.v = (t.reshape(self.B * self.H, t.shape[-2], self.d).contiguous() for t in (q, k, v))
        self.io = _IO[q.dtype]
        self.dtype = q.dtype
        self.scaling = float(scaling)
        self.fill = float(torch.finfo(q.dtype).min)
        self.causal = mask is None and causal and self.sq > 1
        self.offset = self.skv - self.sq
        self.mask_kind, self.mask, self.mask_strides = MASK_NONE, None, (0, 0, 0, 0)
        if mask is not None:
            # additive masks are read as float32 (the sum is taken in float32 either way)
            m = mask if mask.dtype == torch.bool else mask[..., :self.skv].float()
            m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(self.B, self.H, self.sq, self.skv)
            self.mask_strides = tuple(m.stride())
            self.mask = m.view(torch.uint8) if m.dtype == torch.bool else m
            if mask.dtype == torch.bool:
                self.mask_kind = MASK_BOOL
            else:   # torch's type promotion: the sum is rounded to the operands' dtype when the mask has it
                self.mask_kind = MASK_ADD_ROUNDED if mask.dtype == q.dtype != torch.float32 else MASK_ADD
        self.bm, self.bn = block_q, block_k
        self.bd = max(16, triton.next_power_of_2(self.d))
        self.f32_dot = interpreted()    # the interpreter has no bfloat16 dot: exact products either way

    def _common(self) -> dict:
        return dict(IO=self.io, F32_DOT=self.f32_dot, MASK=self.mask_kind, CAUSAL=self.causal,
                    BM=self.bm, BN=self.bn, BD=self.bd)

    def _mask_args(self) -> tuple:
        return (self.mask if self.mask is not None else self.q, *self.mask_strides)

    def _view(self, t: Tensor) -> Tensor:
        return t.view(torch.int16) if self.io == IO_BF16 else t

    def forward(self, quant: bool, scale: float | None, phase: int, stats: Stats | None,
                with_op: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """phase 1: statistics of P into `stats`; phase 2: (O, O' or None, m, l)."""
        bh = self.B * self.H
        o = torch.empty_like(self.q)
        op = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.device) if with_op else o
        m = torch.empty(bh, self.sq, dtype=torch.float32, device=self.q.device)
        l = torch.empty_like(m)
        st = stats if stats is not None else Stats(self.q.device)
        grid = (triton.cdiv(self.sq, self.bm), bh)
        mask_ptr, *strides = self._mask_args()
        _fwd_kernel[grid](self._view(self.q), self._view(self.k), self._view(self.v), self._view(o), op, m, l,
                          mask_ptr, st.amax_bits, st.sumsq, st.counts, self.H, self.sq, self.skv, self.d, *strides,
                          self.scaling, self.fill, self.offset, scale if scale is not None else 1.0,
                          QUANT=quant, SCALED=scale is not None, PHASE=phase, STATS=stats is not None,
                          WITH_OP=with_op, **self._common())
        return o, (op if with_op else None), m, l

    def backward(self, grad_out: Tensor, out_float_p: Tensor, m: Tensor, l: Tensor, quant: bool,
                 scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
        go = grad_out.reshape(self.q.shape).float().contiguous()
        delta = (go * out_float_p).sum(-1)
        dq = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.device)
        dk = torch.empty(self.k.shape, dtype=torch.float32, device=self.q.device)
        dv = torch.empty_like(dk)
        mask_ptr, *strides = self._mask_args()
        args = (self._view(self.q), self._view(self.k), self._view(self.v), go, m, l, delta)
        tail = (self.H, self.sq, self.skv, self.d, *strides, self.scaling, self.fill, self.offset)
        bh = self.B * self.H
        _bwd_dkdv_kernel[(triton.cdiv(self.skv, self.bn), bh)](
            *args, dk, dv, mask_ptr, *tail, scale if scale is not None else 1.0, QUANT=quant,
            SCALED=scale is not None, **self._common())
        _bwd_dq_kernel[(triton.cdiv(self.sq, self.bm), bh)](*args, dq, mask_ptr, *tail, **self._common())
        shape = (self.B, self.H)
        return (dq.reshape(*shape, self.sq, self.d).to(self.dtype), dk.reshape(*shape, self.skv, self.d).to(self.dtype),
                dv.reshape(*shape, self.skv, self.d).to(self.dtype))
