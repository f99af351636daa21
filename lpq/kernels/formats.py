"""Triton kernels for fake quantization of every lpq format, bit-exact with lpq.formats' references.

One kernel per family (hif8, hif4, mx), each with three compile-time variants:

* plain: y = fake_quant(x) (float32 arithmetic, result rounded to x's dtype);
* SCALED: y = fake_quant(x * s) / s with a float32 s (lpq.formats.api.fake_quant_scaled);
* STATS: also accumulates, over the whole tensor, max |x| (as float32 bits, so NaN wins), the
  float64 sum of x^2 (the window rule's RMS), and over xs = x * s and ys = fake_quant(xs) the
  counts TensorQuantizer records: overflow (ys infinite, xs finite), flushed (ys == 0 != xs) and,
  for HiF8, coarse (|xs| >= 2^8, finite).

Exactness on the GPU: every operation is an IEEE one with the rounding the reference uses. The
non-power-of-two divisions use div_rn (Triton's `/` may be approximate), bfloat16 is converted by
integer arithmetic (round to nearest even, as torch), rounding to the E2M1 / E4M3 grids adds and
subtracts 2^23 x step (exact round half to even by the adder), and kernels are compiled with
enable_fp_fusion=False so that no multiply-add is contracted into an FMA. The toolkit MXFP4's
float32 log2 near powers of two is a table of thresholds derived from the reference itself.

Blocks are consecutive elements of a row of a contiguous (rows, L) tensor; a row's last partial
block reads zeros past L, as the reference's zero padding. Rows run on programs of BLOCKS_PER_PROG
blocks (HiF8: flat chunks of HIF8_CHUNK elements, the axis does not matter).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from lpq.formats import mx

HIF8_CHUNK = 1024
BLOCKS_PER_PROG = 64

IO_F32, IO_BF16, IO_F16 = 0, 1, 2
_IO = {torch.float32: IO_F32, torch.bfloat16: IO_BF16, torch.float16: IO_F16}
# mx-family variants (constexpr MODE)
MX_OCP, MX_RCEIL, MX_TOOLKIT, MX_NV = 0, 1, 2, 3
_MX_MODE = {"mxfp4": MX_OCP, "mxfp4-rceil": MX_RCEIL, "mxfp4-toolkit": MX_TOOLKIT, "nvfp4": MX_NV}



# ---------------------------------------------------------------- shared device helpers

@triton.jit
def _load(ptr, offs, mask, IO: tl.constexpr):
    """float32 values of float32 / bfloat16 (read as int16 bits) / float16 storage; 0 past mask."""
    if IO == 1:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bf16_bits(y):
    """int32 whose low 16 bits are bfloat16(y), round to nearest even (NaN -> quiet NaN)."""
    u = y.to(tl.int32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, ((u >> 16) & 0x8000) | 0x7FC0, r)


@triton.jit
def _store(ptr, offs, y, mask, IO: tl.constexpr):
    if IO == 1:
        tl.store(ptr + offs, _bf16_bits(y).to(tl.int16), mask=mask)
    elif IO == 2:
        tl.store(ptr + offs, y.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, y, mask=mask)


@triton.jit
def _bf16_round(y):
    """float32 y rounded to bfloat16 and back."""
    return (_bf16_bits(y) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _pow2(e):
    """2^e as float32 for integer e in [-149, 127] (exponent bits, subnormals included)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << tl.minimum(tl.maximum(e + 149, 0), 22)).to(tl.float32, bitcast=True)   # shift < 32 always
    return tl.where(e >= -126, normal, sub)


@triton.jit
def _abs_bits(x):
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _stats(x, xs, ys, mask, amax_ptr, sumsq_ptr, count_ptr, COARSE: tl.constexpr):
    """Accumulate this program's share of the whole-tensor statistics (see the module doc)."""
    tl.atomic_max(amax_ptr, tl.max(tl.where(mask, _abs_bits(x), 0)))
    x64 = tl.where(mask, x, 0.0).to(tl.float64)
    tl.atomic_add(sumsq_ptr, tl.sum(x64 * x64))
    finite = _abs_bits(xs) < 0x7F800000
    inf = _abs_bits(ys) == 0x7F800000
    tl.atomic_add(count_ptr, tl.sum((mask & inf & finite).to(tl.int64)))
    tl.atomic_add(count_ptr + 1, tl.sum((mask & (ys == 0.0) & (xs != 0.0)).to(tl.int64)))
    if COARSE:
        tl.atomic_add(count_ptr + 2, tl.sum((mask & finite & (_abs_bits(xs) >= 0x43800000)).to(tl.int64)))


@triton.jit
def _e2m1(q):
    """q >= 0 rounded to the E2M1 magnitudes (0, 0.5, ..., 4, 6), ties to even, saturating at 6.
    Adding 2^23 x step puts the step at the adder's last bit: the add rounds half to even."""
    q = tl.minimum(q, 8.0)
    c = tl.where(q < 2.0, 4194304.0, tl.where(q < 4.0, 8388608.0, 16777216.0))
    return tl.minimum((q + c) - c, 6.0)


# ---------------------------------------------------------------- HiF8

@triton.jit
def _hif8_bits(x):
    """int32 bits of the HiF8 value of float32 x (lpq.formats.hif8._quantize_bits)."""
    u = x.to(tl.int32, bitcast=True)
    mag = u & 0x7FFFFFFF
    lifted = tl.minimum(tl.maximum(mag, 0x34800000), 0x47200000)
    ae = tl.abs((lifted >> 23) - 127)
    drop = 20 + (ae >= 4).to(tl.int32) + (ae >= 8).to(tl.int32) + (ae >= 16).to(tl.int32)
    r = ((lifted + (1 << (drop - 1))) >> drop) << drop
    sign = u & -2147483648
    r = r | sign
    r = tl.where(mag < 0x34000000, 0, r)
    r = tl.where(mag >= 0x47200000, sign | 0x7F800000, r)
    return tl.where(mag > 0x7F800000, u, r)


@triton.jit
def _hif8_kernel(x_ptr, y_ptr, n, scale, amax_ptr, sumsq_ptr, count_ptr,
                 IO: tl.constexpr, SCALED: tl.constexpr, STATS: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = _load(x_ptr, offs, mask, IO)
    xs = x * scale if SCALED else x
    ys = _hif8_bits(xs).to(tl.float32, bitcast=True)
    y = tl.math.div_rn(ys, scale) if SCALED else ys
    _store(y_ptr, offs, y, mask, IO)
    if STATS:
        _stats(x, xs, ys, mask, amax_ptr, sumsq_ptr, count_ptr, True)


# ---------------------------------------------------------------- HiF4

@triton.jit
def _hif4_kernel(x_ptr, y_ptr, n_blocks, nblk_row, L, scale, amax_ptr, sumsq_ptr, count_ptr,
                 IO: tl.constexpr, SCALED: tl.constexpr, STATS: tl.constexpr, NB: tl.constexpr):
    # (NB blocks, 16 groups of 4, 4 elements): element i of a block is group i // 4, lane i % 4
    bid = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    row, col0 = bid // nblk_row, (bid % nblk_row) * 64
    g = tl.arange(0, 16)
    e = tl.arange(0, 4)
    col = col0[:, None, None] + (g * 4)[None, :, None] + e[None, None, :]
    mask = (bid < n_blocks)[:, None, None] & (col < L)
    offs = row[:, None, None] * L + col
    x = _load(x_ptr, offs, mask, IO)
    xs = x * scale if SCALED else x
    a_bits = _abs_bits(xs)                                   # NaN above Inf: max propagates NaN
    c_bits = tl.max(a_bits, axis=2)                          # (NB, 16): max over groups of 4
    b_bits = tl.max(tl.reshape(c_bits, (NB, 8, 2)), axis=2)  # (NB, 8): groups of 8
    a_max = tl.max(b_bits, axis=1)                           # (NB,)
    nan_blk = a_max > 0x7F800000
    A = a_max.to(tl.float32, bitcast=True)
    # S0 = bf16(A * c) clamped to [2^-48, 49152]; E6M2 by rounding the float bits to 2 mantissa
    # bits (half to even, carry into the exponent): code = ((E + 48) << 2) | M = bits >> 21 - 316
    s0 = _bf16_round(A * 0.142578125).to(tl.int32, bitcast=True)       # c = bf16(1/7)
    s0 = tl.minimum(tl.maximum(s0, 0x27800000), 0x47400000)
    code = ((s0 + 0xFFFFF + ((s0 >> 21) & 1)) >> 21) - 316
    S = (((code >> 2) - 48 + 127) << 23 | (code & 3) << 21).to(tl.float32, bitcast=True)
    R = _bf16_round(tl.math.div_rn(tl.full(S.shape, 1.0, tl.float32), S))
    B = b_bits.to(tl.float32, bitcast=True)
    C = c_bits.to(tl.float32, bitcast=True)
    e8 = (B * R[:, None]) >= 4.0                              # (NB, 8)
    e8_16 = tl.reshape(tl.broadcast_to(e8[:, :, None], (NB, 8, 2)), (NB, 16))
    e16 = (C * R[:, None]) * tl.where(e8_16, 0.5, 1.0) >= 2.0
    d = e8_16.to(tl.int32) + e16.to(tl.int32)                 # (NB, 16)
    t = ((tl.abs(xs) * _pow2(-d)[:, :, None]) * R[:, None, None]) * 4.0
    fl = tl.floor(t)
    k = tl.minimum(fl + ((t - fl) >= 0.5).to(tl.float32), 7.0)
    mag = ((k * 0.25) * _pow2(d)[:, :, None]) * S[:, None, None]
    ys = (mag.to(tl.int32, bitcast=True) | (xs.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    ys = tl.where(nan_blk[:, None, None], float("nan"), ys)
    y = tl.math.div_rn(ys, scale) if SCALED else ys
    _store(y_ptr, offs, y, mask, IO)
    if STATS:
        _stats(x, xs, ys, mask, amax_ptr, sumsq_ptr, count_ptr, False)


# ---------------------------------------------------------------- MXFP4 family and NVFP4

@triton.jit
def _mx_kernel(x_ptr, y_ptr, n_blocks, nblk_row, L, scale, nv_s_ptr, thr_ptr, amax_ptr, sumsq_ptr, count_ptr,
               IO: tl.constexpr, SCALED: tl.constexpr, STATS: tl.constexpr, MODE: tl.constexpr,
               BS: tl.constexpr, NB: tl.constexpr):
    bid = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    row, col0 = bid // nblk_row, (bid % nblk_row) * BS
    col = col0[:, None] + tl.arange(0, BS)[None, :]
    mask = (bid < n_blocks)[:, None] & (col < L)
    offs = row[:, None] * L + col
    x = _load(x_ptr, offs, mask, IO)
    xs = x * scale if SCALED else x
    ax = tl.abs(xs)
    amax_bits = tl.max(_abs_bits(xs), axis=1)                 # (NB,), NaN above Inf
    sign = xs.to(tl.int32, bitcast=True) & -2147483648
    if MODE == 3:
        # NVFP4: s (the per-tensor scale, from the whole tensor's amax) was computed by torch
        s = tl.load(nv_s_ptr)
        amax_b = amax_bits.to(tl.float32, bitcast=True)
        v = tl.minimum(tl.math.div_rn(tl.math.div_rn(amax_b, 6.0), s), 448.0)
        # float8_e4m3fn, nearest even: subnormals (< 2^-6) on the 2^-9 grid by the adder, normals
        # by rounding the float bits to 3 mantissa bits
        vb = v.to(tl.int32, bitcast=True)
        normal = ((vb + 0x7FFFF + ((vb >> 20) & 1)) >> 20 << 20).to(tl.float32, bitcast=True)
        b = tl.where(v < 0.015625, (v + 16384.0) - 16384.0, normal)
        bs = b * s
        zero = bs == 0.0
        q = tl.math.div_rn(ax, tl.where(zero, 1.0, bs)[:, None])
        m = tl.where(zero[:, None], 0.0, _e2m1(q))
        mag = (m * b[:, None]) * s
        ys = (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        ys = tl.where(s != s, float("nan"), ys)             # a non-finite tensor amax: all NaN
    else:
        if MODE == 0:
            X = tl.maximum((amax_bits >> 23) - 129, -127)
            nan_blk = amax_bits >= 0x7F800000
        elif MODE == 1:
            # d = fp32(amax * fp32(1/6)); the literal is fp32(1/6) exactly
            db = (amax_bits.to(tl.float32, bitcast=True) * 0.1666666716337204).to(tl.int32, bitcast=True)
            field, mant = db >> 23, db & 0x7FFFFF
            normal = field - 127 + (mant != 0).to(tl.int32)
            sub = tl.where(mant > (1 << 22), -126, -127)
            X = tl.minimum(tl.maximum(tl.where(field > 0, normal, sub), -127), 127)
            nan_blk = amax_bits >= 0x7F800000
        else:
            # v = fp32(amax + fp32(9.6e-7)) (the literal is that float32); floor(log2 v) from its
            # exponent field, plus one from the threshold table near a power of two
            vb = (amax_bits.to(tl.float32, bitcast=True) + 9.599999657439184e-07).to(tl.int32, bitcast=True)
            field = vb >> 23
            thr = tl.load(thr_ptr + tl.minimum(field, 255))
            e = field - 127 + ((vb & 0x7FFFFF) >= thr).to(tl.int32)
            X = tl.minimum(e - 2, 125)
            nan_blk = amax_bits > 0x7F800000
        X = tl.where(nan_blk, 0, X)
        if MODE == 2:
            xb = ax * _pow2(-X)[:, None]
            pe = tl.minimum(tl.maximum((_abs_bits(xb) >> 23) - 127, 0), 2)
            t = tl.floor(xb * _pow2(1 - pe) + 0.5)
            fp = tl.minimum(t * _pow2(pe - 1), 6.0)
            sgn = tl.where(xs > 0.0, 1.0, tl.where(xs < 0.0, -1.0, 0.0))
            ys = (sgn * _pow2(X)[:, None]) * fp
        else:
            m = _e2m1(ax * _pow2(-X)[:, None])
            mag = m * _pow2(X)[:, None]
            ys = (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        ys = tl.where(nan_blk[:, None], float("nan"), ys)
    y = tl.math.div_rn(ys, scale) if SCALED else ys
    _store(y_ptr, offs, y, mask, IO)
    if STATS:
        _stats(x, xs, ys, mask, amax_ptr, sumsq_ptr, count_ptr, False)


@triton.jit
def _amax_bits_kernel(x_ptr, n, scale, out_ptr, IO: tl.constexpr, SCALED: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = _load(x_ptr, offs, mask, IO)
    xs = x * scale if SCALED else x
    tl.atomic_max(out_ptr, tl.max(tl.where(mask, _abs_bits(xs), 0)))


@triton.jit
def _moments_kernel(x_ptr, n, amax_ptr, sumsq_ptr, IO: tl.constexpr, CHUNK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = _load(x_ptr, offs, mask, IO)
    tl.atomic_max(amax_ptr, tl.max(tl.where(mask, _abs_bits(x), 0)))
    x64 = x.to(tl.float64)
    tl.atomic_add(sumsq_ptr, tl.sum(x64 * x64))


# ---------------------------------------------------------------- host side

@lru_cache(maxsize=None)
def _toolkit_thresholds(device: str) -> Tensor:
    """int32 (256,): per float32 exponent field, the smallest mantissa field from which the
    toolkit's floor(log2 v) is one more than the field's exponent (2^23: never). Derived from
    mx.toolkit_floor_log2 on every value within 256 ulps below a power of two."""
    fields = torch.arange(256, dtype=torch.int32)
    mants = torch.arange(mx.NEAR_POW2_MANT, 1 << 23, dtype=torch.int32)
    bits = ((fields[:, None] << 23) | mants[None, :])[:255]
    up = mx.toolkit_floor_log2(bits.reshape(-1).view(torch.float32).contiguous()).reshape(bits.shape)
    up = up == (fields[:255, None] - 127 + 1)
    # monotone in the mantissa (log2 and rounding are), so the first True is the threshold
    if not torch.equal(up, up.cummax(dim=1).values):
        raise RuntimeError("toolkit log2 thresholds are not monotone")
    first = torch.where(up.any(1), mants[up.int().argmax(1)], torch.tensor(1 << 23, dtype=torch.int32))
    return torch.cat([first, torch.tensor([1 << 23], dtype=torch.int32)]).to(device)


class Stats:
    """Whole-tensor statistics from a STATS launch (tensors on the input's device)."""

    def __init__(self, device: torch.device):
        self.amax_bits = torch.zeros(1, dtype=torch.int32, device=device)
        self.sumsq = torch.zeros(1, dtype=torch.float64, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)   # overflow, flushed, coarse

    @property
    def amax(self) -> Tensor:
        """max |x| (float32, NaN if x holds one)."""
        return self.amax_bits.view(torch.float32)[0]


def _io(x: Tensor) -> tuple[Tensor, int]:
    if x.dtype not in _IO:
        raise TypeError(f"Triton fake-quant kernels take float32, bfloat16 or float16, got {x.dtype}")
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x), _IO[x.dtype]


def _nvfp4_tensor_scale(x2d: Tensor, scale: float | None, io: int, xv: Tensor) -> Tensor:
    """NVFP4's s = fp32(amax / 2688) (1 when 0, NaN when amax is not finite), computed by torch from
    the amax a Triton pass finds, exactly as lpq.formats.mx._nv_elements does."""
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x2d.device)
    n = x2d.numel()
    _amax_bits_kernel[(triton.cdiv(n, HIF8_CHUNK),)](xv, n, scale if scale is not None else 1.0, amax_bits,
                                                     IO=io, SCALED=scale is not None, CHUNK=HIF8_CHUNK)
    amax = amax_bits.view(torch.float32)[0]
    s = amax / mx.NV_TENSOR_DIV
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.where(amax_bits[0] >= 0x7F800000, torch.full_like(s, float("nan")), s).reshape(1)


def fake_quant_rows(x2d: Tensor, fmt: str, scale: float | None = None, stats: Stats | None = None) -> Tensor:
    """fake_quant of a contiguous (rows, L) tensor along its rows (x2d's dtype), or with `scale`
    fake_quant_scaled; `stats`, if given, accumulates the statistics of the module doc."""
    if not x2d.is_contiguous() or x2d.dim() != 2:
        raise ValueError("fake_quant_rows expects a contiguous 2-D tensor")
    y2d = torch.empty_like(x2d)
    if x2d.numel() == 0:
        return y2d
    xv, io = _io(x2d)
    yv = y2d.view(torch.int16) if io == IO_BF16 else y2d
    scaled = scale is not None
    s = float(scale) if scaled else 1.0
    st = stats if stats is not None else _NO_STATS.get(x2d.device)
    common = dict(IO=io, SCALED=scaled, STATS=stats is not None, enable_fp_fusion=False)
    rows, L = x2d.shape
    if fmt == "hif8":
        n = x2d.numel()
        _hif8_kernel[(triton.cdiv(n, HIF8_CHUNK),)](xv, yv, n, s, st.amax_bits, st.sumsq, st.counts,
                                                    CHUNK=HIF8_CHUNK, **common)
    elif fmt == "hif4":
        nblk = triton.cdiv(L, 64)
        nb = BLOCKS_PER_PROG // 4
        _hif4_kernel[(triton.cdiv(rows * nblk, nb),)](xv, yv, rows * nblk, nblk, L, s, st.amax_bits, st.sumsq,
                                                      st.counts, NB=nb, **common)
    elif fmt in _MX_MODE:
        mode, bs = _MX_MODE[fmt], mx.BLOCKS[fmt]
        nblk = triton.cdiv(L, bs)
        nv_s = _nvfp4_tensor_scale(x2d, scale, io, xv) if mode == MX_NV else st.sumsq
        thr = _toolkit_thresholds(str(x2d.device)) if mode == MX_TOOLKIT else st.counts
        _mx_kernel[(triton.cdiv(rows * nblk, BLOCKS_PER_PROG),)](
            xv, yv, rows * nblk, nblk, L, s, nv_s, thr, st.amax_bits, st.sumsq, st.counts,
            MODE=mode, BS=bs, NB=BLOCKS_PER_PROG, **common)
    else:
        raise ValueError(f"no Triton kernel for format {fmt!r}")
    return y2d


class _NoStats(dict):
    """Placeholder buffers for launches without statistics (the pointers must still exist)."""

    def get(self, device: torch.device) -> Stats:   # type: ignore[override]
        key = str(device)
        if key not in self:
            self[key] = Stats(device)
        return self[key]


_NO_STATS = _NoStats()


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(max |x| as float32, sum of x^2 as float64) of a whole tensor in one read (0-d tensors)."""
    xc = x.contiguous()
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    sumsq = torch.zeros(1, dtype=torch.float64, device=x.device)
    if xc.numel():
        xv, io = _io(xc)
        n = xc.numel()
        _moments_kernel[(triton.cdiv(n, HIF8_CHUNK),)](xv, n, amax_bits, sumsq, IO=io, CHUNK=HIF8_CHUNK)
    return amax_bits.view(torch.float32)[0], sumsq[0]
