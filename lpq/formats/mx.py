"""MXFP4-family reference quantizers in plain PyTorch (formats.md section 3).

Four formats share the FP4 E2M1 element (bits `S EE M`, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 for
magnitude codes 0..7; +-0 both exist). All functions take 2-D float32 tensors (rows, Lp) whose
length Lp is already zero-padded to a multiple of the block; blocks are consecutive elements of a
row. Exponents come from the float32 bit patterns, never from a float log2, except where the
toolkit variant reproduces its own float32 log2 (see below).

"mxfp4" (OCP MX v1.0, block 32, formats.md 3.3):
  * amax = max |x| over the block; shared exponent X = floor(log2 amax) - 2, taken from amax's
    exponent field, clamped to >= -127 (zero and tiny blocks get -127, i.e. 2^-127, an fp32
    subnormal: pitfall 13);
  * element = E2M1(|x| / 2^X) rounded to nearest, ties to even, computed exactly, saturating at 6;
    value = copysign(element * 2^X, x): a negative x that rounds to zero gives -0, and -0 stays -0;
  * amax NaN or Inf: the scale is NaN (E8M0 0xFF) and the whole block is NaN.

"mxfp4-rceil" (formats.md 3.4, RCEIL): X = ceil(log2(d)) with d = fp32(amax * fp32(1/6)), computed
  exactly from d's bits (the E8M0 round-up conversion, NVIDIA `cvt.rp.satfinite.ue8m0x2.f32`),
  clamped to [-127, 127]; elements and specials as "mxfp4". torchao 0.18 computes d as amax / 6,
  which gives the same exponent for every amax (tested). Two deliberate differences from its eager
  CPU fallback (which matches this rule on every vector case): torchao takes
  ceil(torch.log2(d)) in float32, which rounds d a few ulps above 2^k down to k; and for E8M0 byte 0
  it quantizes x itself instead of x * 2^127, flushing blocks with amax <= 6 * 2^-127 to zero. It
  also returns Inf-and-zeros for an Inf block, where this rule gives a NaN block. X can reach 126
  here, so a block with amax > 3.5 * 2^126 may dequantize to 4 * 2^126 = 2^128: +-Inf in float32.

"mxfp4-toolkit" (formats.md 3.5): the HiFloat4 toolkit's QType('mxfp4') PyTorch path, float32:
  * X = floor(log2(fp32(amax + fp32(9.6e-7)))) - 2, clipped to <= 125 (the toolkit's lower clip,
    -129, never binds: the epsilon keeps X >= -22). The float32 log2 is taken as the correctly
    rounded one: it differs from the exponent field of v = fp32(amax + eps) only for v within 256
    ulps below a power of two, where it is evaluated as fp32(log2(float64 v)); tests check that
    this equals torch.log2 in float32 on every such v and that the float64 result is never close
    to a float32 rounding boundary, so any faithful float64 log2 (C++ kernel included) agrees;
  * xb = |x| / 2^X; private exponent p = floor(log2 xb) clipped to [0, 2] (the toolkit's own
    +9.6e-7 inside that log2 can only move p up at a binade edge, where both choices give the same
    element); element = min(floor(fp32(xb * 2^(1-p) + 0.5)) * 2^(p-1), 6): half away from zero,
    including the float32 "+0.5" trap (xb = 0.25 - 2^-26 gives 0.5);
  * value = torch.sign(x) * 2^X * element: -0 and +0 give +0, a negative x rounding to 0 gives -0;
  * a NaN anywhere in the block makes the block NaN; an Inf (no NaN) makes amax Inf, X = 125 and
    the Inf element +-6 * 2^125, the other elements round with X = 125 (normally to +-0).

"nvfp4" (comparison format, no vectors; block 16; float32 arithmetic throughout):
  * s = fp32(amax_tensor / 2688) (2688 = 6 * 448); s = 1 when that is 0 (amax 0, or a subnormal
    amax so small that the division underflows); a non-finite tensor amax makes the whole tensor
    NaN;
  * block scale b = e4m3fn(min(fp32(fp32(amax_block / 6) / s), 448)): round to nearest even onto
    the float8_e4m3fn grid (subnormals included), saturating at 448 (torch's CPU cast also
    saturates; the clamp makes it explicit);
  * bs = fp32(b * s); if bs == 0 (b == 0, or an underflow with a subnormal s) every element of the
    block is a signed zero; otherwise element = E2M1(fp32(|x| / bs)) to nearest even, saturating
    at 6;
  * value = copysign(fp32(fp32(element * b) * s), x), which is also the decode formula.

Packed layout (docs/design.md, bit-order version 1):
  * codes: uint8 (rows, Lp/2), element 2i in the low nibble, 2i+1 in the high nibble; nibble =
    (sign << 3) | magnitude code (E2M1 `S EE M`). The sign is x's sign bit for mxfp4, mxfp4-rceil
    and nvfp4, and (x < 0) for mxfp4-toolkit, so every signed zero of fake_quant is reproduced;
  * scales: mxfp4*: uint8 (rows, Lp/32), E8M0 byte X + 127, 0xFF = NaN (a NaN block stores 0xFF
    with all nibbles 0); nvfp4: uint8 (rows, Lp/16), float8_e4m3fn bit pattern of b (a NaN tensor
    stores 0x7F everywhere with all nibbles 0);
  * tensor_scale: None for mxfp4*, a float32 0-d tensor s for nvfp4 (NaN for a NaN tensor).
  decode(encode(x)) == fake_quant(x) bit for bit, signed zeros included; NaNs are the canonical
  quiet NaN.

Public helpers for algorithms: shared_exponent_ref (the exponents a format picks, 128 marking a
NaN block, i.e. E8M0 0xFF), fake_quant_with_exponent_ref (OCP elements for given exponents) and
grid(fmt), the `lpq.formats.grid.BlockGrid` of mxfp4 and mxfp4-rceil (default exponents, exponent
search, rounding onto fixed per-element exponents for GPTQ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCKS = {"mxfp4": 32, "mxfp4-rceil": 32, "mxfp4-toolkit": 32, "nvfp4": 16}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # index = magnitude code
E2M1_MAX = 6.0
E8M0_NAN = 0xFF
NAN_EXP = E8M0_NAN - 127           # exponent value standing for the NaN scale
E4M3_MAX = 448.0
E4M3_NAN = 0x7F
NV_TENSOR_DIV = 6.0 * 448.0
TOOLKIT_EPS = 9.6e-7
TOOLKIT_MAX_EXP = 125
NEAR_POW2_MANT = 0x7FFF00          # mantissa fields >= this lie within 256 ulps below a power of 2

_ABS = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_MANT = 0x7FFFFF


def _check(x2d: Tensor, fmt: str) -> int:
    if fmt not in BLOCKS:
        raise ValueError(f"unknown MX-family format {fmt!r}; valid: {', '.join(BLOCKS)}")
    if not isinstance(x2d, Tensor) or x2d.dim() != 2 or x2d.dtype != torch.float32:
        raise ValueError("expected a 2-D float32 tensor (rows, Lp)")
    block = BLOCKS[fmt]
    if x2d.shape[1] % block:
        raise ValueError(f"{fmt}: length {x2d.shape[1]} is not a multiple of the block {block}")
    return block


def _abs_bits(x: Tensor) -> Tensor:
    """|x| as int32 bit patterns: their integer order is the float order, NaN above Inf."""
    return x.contiguous().view(torch.int32) & _ABS


def _block_amax_bits(x2d: Tensor, block: int) -> Tensor:
    """(rows, Lp/block) int32 bits of max |x|; any NaN in the block yields NaN bits (> Inf)."""
    rows, lp = x2d.shape
    return _abs_bits(x2d).view(rows, lp // block, block).amax(dim=2)


def _bits_to_float(bits: Tensor) -> Tensor:
    return bits.contiguous().view(torch.float32)


def _pow2(e: Tensor, dtype: torch.dtype) -> Tensor:
    """2^e exactly (e integer tensor; float64 is exact for every exponent used here)."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float64), e.to(torch.float64)).to(dtype)


def _e2m1_rne(q: Tensor) -> Tensor:
    """Round q >= 0 onto the E2M1 magnitudes, ties to even, saturating at 6 (exact: steps are
    powers of two, so q / step is exact and torch.round rounds half to even)."""
    step = torch.where(q < 2, 0.5, torch.where(q < 4, 1.0, 2.0)).to(q.dtype)
    return (torch.round(q / step) * step).clamp(max=E2M1_MAX)


def _e2m1_code(mag: Tensor) -> Tensor:
    """Magnitude code 0..7 of a value already on the E2M1 magnitude grid."""
    grid = torch.tensor(E2M1_VALUES, dtype=mag.dtype, device=mag.device)
    return torch.bucketize(mag, grid).to(torch.uint8)


def _pack(nibbles: Tensor) -> Tensor:
    """(rows, Lp) nibbles -> (rows, Lp/2) bytes, element 2i in the low nibble."""
    n = nibbles.to(torch.uint8)
    return (n[:, 0::2] | (n[:, 1::2] << 4)).contiguous()


def _unpack(codes: Tensor) -> Tensor:
    rows, half = codes.shape
    return torch.stack((codes & 0xF, codes >> 4), dim=2).reshape(rows, 2 * half)


# ---------------------------------------------------------------------------------------------
# shared exponents


def _ocp_exponent(amax_bits: Tensor) -> Tensor:
    field = amax_bits >> 23
    exp = (field - 129).clamp(min=-127)   # floor(log2 amax) - 2; subnormal/zero amax -> -127
    return torch.where(amax_bits >= _INF_BITS, NAN_EXP, exp).to(torch.int32)


def _rceil_exponent(amax_bits: Tensor) -> Tensor:
    sixth = torch.tensor(1.0, dtype=torch.float32) / 6       # fp32(1/6), correctly rounded
    d = _bits_to_float(amax_bits) * sixth.to(amax_bits.device)
    db = d.view(torch.int32)
    field, mant = db >> 23, db & _MANT
    normal = field - 127 + (mant != 0).to(torch.int32)
    # subnormal d: ceil(log2 d) is -126 above 2^-127 (mantissa > 2^22), else <= -127
    sub = torch.where(mant > (1 << 22), -126, -127)
    exp = torch.where(field > 0, normal, sub).clamp(-127, 127)
    return torch.where(amax_bits >= _INF_BITS, NAN_EXP, exp).to(torch.int32)


def toolkit_floor_log2(v: Tensor) -> Tensor:
    """floor(log2 v) of the correctly rounded float32 log2 of positive float32 v (int32).

    Equal to v's exponent field except within 256 ulps below a power of two, where the float32
    log2 may round up to the power; there it is fp32(log2(float64 v)).
    """
    vb = v.view(torch.int32)
    exp = (vb >> 23) - 127
    near = ((vb & _MANT) >= NEAR_POW2_MANT) & (vb < _INF_BITS)
    if bool(near.any()):
        lg = torch.floor(torch.log2(v[near].double()).float()).to(torch.int32)
        exp = exp.clone()
        exp[near] = lg
    return exp


def _toolkit_exponent(amax_bits: Tensor) -> Tensor:
    eps = torch.tensor(TOOLKIT_EPS, dtype=torch.float32, device=amax_bits.device)
    v = _bits_to_float(amax_bits) + eps                       # float32 add, as the toolkit
    exp = (toolkit_floor_log2(v) - 2).clamp(max=TOOLKIT_MAX_EXP)
    return torch.where(amax_bits > _INF_BITS, NAN_EXP, exp).to(torch.int32)


def shared_exponent_ref(x2d: Tensor, fmt: str) -> Tensor:
    """int32 (rows, Lp/32): the shared exponent each 32-block gets in `fmt`; 128 = NaN scale."""
    block = _check(x2d, fmt)
    if fmt == "nvfp4":
        raise ValueError("nvfp4 has no shared exponent (its block scale is an e4m3fn value)")
    amax = _block_amax_bits(x2d, block)
    if fmt == "mxfp4":
        return _ocp_exponent(amax)
    if fmt == "mxfp4-rceil":
        return _rceil_exponent(amax)
    return _toolkit_exponent(amax)


# ---------------------------------------------------------------------------------------------
# element quantizers


def _ocp_elements(x2d: Tensor, scale_exp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E2M1 magnitudes (rows, nb, 32) float64, exponents (rows, nb, 1), NaN-block mask."""
    rows, lp = x2d.shape
    if lp % 32:
        raise ValueError(f"length {lp} is not a multiple of the block 32")
    nb = lp // 32
    if not isinstance(scale_exp, Tensor) or tuple(scale_exp.shape) != (rows, nb):
        raise ValueError(f"scale_exp must be a ({rows}, {nb}) integer tensor")
    if scale_exp.is_floating_point() or scale_exp.is_complex():
        raise ValueError(f"scale_exp must be an integer tensor, got {scale_exp.dtype}")
    se = scale_exp.to(device=x2d.device, dtype=torch.int64)
    if se.numel() and (int(se.min()) < -127 or int(se.max()) > NAN_EXP):
        raise ValueError("scale_exp must lie in [-127, 127], or be 128 for a NaN block")
    nan = (se == NAN_EXP) | (_block_amax_bits(x2d, 32) >= _INF_BITS)
    se = se.unsqueeze(2)
    xb = x2d.view(rows, nb, 32).double()
    q = xb.abs() * _pow2(-se, torch.float64)
    return _e2m1_rne(q), se, nan


def fake_quant_with_exponent_ref(x2d: Tensor, scale_exp: Tensor) -> Tensor:
    """OCP MXFP4 elements (RNE, saturating at 6) of x2d (rows, Lp) float32 for given per-32-block
    exponents (int, (rows, Lp/32), in [-127, 127]; 128 = NaN scale). Blocks holding NaN or Inf
    are NaN whatever the exponent."""
    if not isinstance(x2d, Tensor) or x2d.dim() != 2 or x2d.dtype != torch.float32:
        raise ValueError("expected a 2-D float32 tensor (rows, Lp)")
    mag, se, nan = _ocp_elements(x2d, scale_exp)
    xb = x2d.view(mag.shape)
    y = torch.copysign(mag * _pow2(se, torch.float64), xb.double()).float()
    y = torch.where(nan.unsqueeze(2), float("nan"), y)
    return y.view_as(x2d)


def _toolkit_elements(x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 element magnitudes (rows, nb, 32), exponents (rows, nb, 1), NaN-block mask."""
    rows, lp = x2d.shape
    nb = lp // 32
    se = _toolkit_exponent(_block_amax_bits(x2d, 32))
    nan = se == NAN_EXP
    se = torch.where(nan, 0, se).unsqueeze(2)
    xb = x2d.view(rows, nb, 32).abs() / _pow2(se, torch.float32)
    pe = ((xb.view(torch.int32) >> 23) - 127).clamp(0, 2)
    m = xb * _pow2(1 - pe, torch.float32)
    t = torch.floor(m + torch.tensor(0.5, dtype=torch.float32, device=x2d.device))
    fp = (t * _pow2(pe - 1, torch.float32)).clamp(max=E2M1_MAX)
    return fp, se, nan


def _nv_elements(x2d: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """E2M1 magnitudes (rows, nb, 16) float32 (0 where b * s == 0), b (rows, nb, 1) float32,
    s (float32 0-d) and whether the tensor amax is non-finite (then s and b are NaN)."""
    rows, lp = x2d.shape
    nb = lp // 16
    bits = _abs_bits(x2d)
    amax_t = int(bits.max()) if bits.numel() else 0
    if amax_t >= _INF_BITS:
        nan = torch.tensor(float("nan"), dtype=torch.float32, device=x2d.device)
        return x2d.new_zeros(rows, nb, 16), x2d.new_full((rows, nb, 1), float("nan")), nan, True
    s = _bits_to_float(torch.tensor(amax_t, dtype=torch.int32, device=x2d.device)) / NV_TENSOR_DIV
    if float(s) == 0.0:
        s = torch.ones((), dtype=torch.float32, device=x2d.device)
    amax_b = _bits_to_float(_block_amax_bits(x2d, 16)).unsqueeze(2)
    v = ((amax_b / 6.0) / s).clamp(max=E4M3_MAX)
    b = v.to(torch.float8_e4m3fn).float()
    bs = b * s
    zero = bs == 0
    q = x2d.view(rows, nb, 16).abs() / torch.where(zero, 1.0, bs)
    mag = torch.where(zero, 0.0, _e2m1_rne(q))
    return mag, b, s, False


# ---------------------------------------------------------------------------------------------
# the three entry points the dispatcher calls


def fake_quant_ref(x2d: Tensor, fmt: str) -> Tensor:
    """Quantize-dequantize (rows, Lp) float32 along the rows in `fmt`; float32 (rows, Lp)."""
    _check(x2d, fmt)
    x2d = x2d.contiguous()
    if fmt in ("mxfp4", "mxfp4-rceil"):
        return fake_quant_with_exponent_ref(x2d, shared_exponent_ref(x2d, fmt))
    if fmt == "mxfp4-toolkit":
        fp, se, nan = _toolkit_elements(x2d)
        xb = x2d.view(fp.shape)
        y = torch.sign(xb) * _pow2(se, torch.float32) * fp
        return torch.where(nan.unsqueeze(2), float("nan"), y).view_as(x2d)
    mag, b, s, all_nan = _nv_elements(x2d)
    if all_nan:
        return torch.full_like(x2d, float("nan"))
    y = torch.copysign((mag * b) * s, x2d.view(mag.shape))
    return y.view_as(x2d)


def encode_ref(x2d: Tensor, fmt: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(codes uint8 (rows, Lp/2), scales uint8, tensor_scale float32 0-d or None); see the module
    docstring for the layout."""
    _check(x2d, fmt)
    x2d = x2d.contiguous()
    rows, lp = x2d.shape
    sign_bit = torch.signbit(x2d)
    if fmt in ("mxfp4", "mxfp4-rceil"):
        mag, se, nan = _ocp_elements(x2d, shared_exponent_ref(x2d, fmt))
        scales = torch.where(nan, E8M0_NAN, se.squeeze(2) + 127)
    elif fmt == "mxfp4-toolkit":
        mag, se, nan = _toolkit_elements(x2d)
        sign_bit = x2d < 0
        scales = torch.where(nan, E8M0_NAN, se.squeeze(2) + 127)
    else:
        mag, b, s, all_nan = _nv_elements(x2d)
        nan = torch.full((rows, lp // 16), all_nan, dtype=torch.bool, device=x2d.device)
        if all_nan:
            scales = torch.full((rows, lp // 16), E4M3_NAN, dtype=torch.uint8, device=x2d.device)
        else:
            scales = b.squeeze(2).to(torch.float8_e4m3fn).view(torch.uint8)
    nib = _e2m1_code(mag).view(rows, lp) | (sign_bit.to(torch.uint8) << 3)
    nib = torch.where(nan.repeat_interleave(BLOCKS[fmt], dim=1), 0, nib)
    codes = _pack(nib)
    scales = scales.to(torch.uint8).contiguous()
    return codes, scales, (s.reshape(()).clone() if fmt == "nvfp4" else None)


def _check_packed(codes: Tensor, scales: Tensor | None, tensor_scale: Tensor | None, fmt: str,
                  lp: int) -> int:
    if fmt not in BLOCKS:
        raise ValueError(f"unknown MX-family format {fmt!r}; valid: {', '.join(BLOCKS)}")
    block = BLOCKS[fmt]
    if not isinstance(codes, Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"{fmt}: codes must be a 2-D uint8 tensor")
    if lp < 0 or lp % block or codes.shape[1] * 2 != lp:
        raise ValueError(f"{fmt}: Lp={lp} must be a multiple of {block} and equal 2 * codes.shape[1] "
                         f"(codes {tuple(codes.shape)})")
    want = (codes.shape[0], lp // block)
    if not isinstance(scales, Tensor) or scales.dtype != torch.uint8 or tuple(scales.shape) != want:
        raise ValueError(f"{fmt}: scales must be a uint8 tensor of shape {want}")
    if fmt == "nvfp4":
        if not isinstance(tensor_scale, Tensor) or tensor_scale.dtype != torch.float32 \
                or tensor_scale.numel() != 1:
            raise ValueError("nvfp4: tensor_scale must be a float32 tensor with one element")
    elif tensor_scale is not None:
        raise ValueError(f"{fmt}: tensor_scale must be None")
    return block


def decode_ref(codes: Tensor, scales: Tensor | None, tensor_scale: Tensor | None, fmt: str,
               Lp: int) -> Tensor:
    """float32 (rows, Lp) values of packed data (layout in the module docstring)."""
    block = _check_packed(codes, scales, tensor_scale, fmt, Lp)
    rows = codes.shape[0]
    nib = _unpack(codes).long()
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = grid[nib & 7].view(rows, Lp // block, block)
    neg = (nib >= 8).view(mag.shape)
    if fmt == "nvfp4":
        b = scales.view(torch.float8_e4m3fn).float().unsqueeze(2)
        s = tensor_scale.reshape(()).to(codes.device)
        y = (torch.where(neg, -mag, mag) * b) * s
        y = torch.where(torch.isnan(y), float("nan"), y)
    else:
        byte = scales.long().unsqueeze(2)
        y = torch.where(neg, -mag, mag).double() * _pow2(byte - 127, torch.float64)
        y = torch.where(byte == E8M0_NAN, float("nan"), y).float()
    return y.reshape(rows, Lp)


# ---------------------------------------------------------------------------------------------
# the block grid (lpq.formats.grid.BlockGrid) for PTQ algorithms


@dataclass(frozen=True)
class MxSearch:
    """Candidates of shared-exponent search: `steps` added to the OCP floor exponent (`from_floor`)
    or to the format's own exponent (clamped to [-127, 127]; NaN blocks stay NaN). floor and
    floor + 1 are the two exponents an MX scale rule can pick (floor, RCEIL, EVEN, CEIL)."""

    steps: tuple[int, ...] = (0, 1)
    from_floor: bool = True


class MxGrid:
    """OCP elements (E2M1, RNE, saturating at 6) under a shared exponent per 32-block."""

    block = 32
    default_space = MxSearch()
    only_default = MxSearch((0,), from_floor=False)

    def __init__(self, fmt: str):
        self.fmt = fmt

    def default_meta(self, x2d: Tensor) -> Tensor:
        return shared_exponent_ref(x2d, self.fmt)

    def element_scales(self, exponents: Tensor) -> tuple[Tensor, Tensor]:
        """(2^X, 2^-X) per element in float64 (exact for every exponent); 2^X is NaN for a NaN block."""
        se = exponents.to(torch.int64).repeat_interleave(self.block, dim=-1)
        scale = torch.where(se == NAN_EXP, float("nan"), _pow2(se, torch.float64))
        return scale, _pow2(-se, torch.float64)

    def round(self, x: Tensor, scales: tuple[Tensor, ...]) -> Tensor:
        scale, inv = scales
        mag = _e2m1_rne(x.abs().double() * inv)      # exact in float64
        return torch.copysign(mag * scale, x.double()).float()

    def search_meta(self, x2d: Tensor, importance: Tensor | None = None, space: MxSearch | None = None) -> Tensor:
        space = space or self.default_space
        _check(x2d, self.fmt)
        rows, L = x2d.shape
        w = (torch.ones(L) if importance is None else importance.float()).view(1, L)
        base = _ocp_exponent(_block_amax_bits(x2d, self.block)) if space.from_floor else self.default_meta(x2d)
        best_err: Tensor | None = None
        best = base
        for step in space.steps:
            e = torch.where(base == NAN_EXP, base, (base + step).clamp(-127, 127))
            q = self.round(x2d, self.element_scales(e))
            err = ((q - x2d) ** 2 * w).view(rows, L // self.block, self.block).sum(-1)
            if best_err is None:
                best_err, best = err, e
                continue
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, e, best)
        return best


_GRIDS = {f: MxGrid(f) for f in ("mxfp4", "mxfp4-rceil")}


def grid(fmt: str) -> MxGrid | None:
    return _GRIDS.get(fmt)
