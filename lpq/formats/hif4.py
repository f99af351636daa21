"""HiFloat4 (HiF4) reference quantizer in plain PyTorch (formats.md section 2).

Semantics: the official toolkit's algorithm (formats.md 2.2, steps 1-8) with the CUDA-kernel
arithmetic chosen in 2.3: float32 products, and an EXACT "t + 0.5 then floor" for the elements
(the PyTorch toolkit path does that add in float32 and differs on the documented fp32 trap).

Per 64-element block (consecutive elements of a row):

* A = max|x| over the block, B_g over groups of 8, C_j over groups of 4;
* S0 = bf16(fp32(A * c)), c = bf16(1/7) = 0.142578125, clamped to [2^-48, 49152];
* S = S0 rounded to E6M2 (2 mantissa bits, round half to even, carry into the exponent);
* R = bf16(fp32(1 / S));
* E1_8[g] = fp32(B_g * R) >= 4; E1_16[j] = fp32(C_j * R) / 2^E1_8[j div 2] >= 2;
* d_i = E1_8[i div 8] + E1_16[i div 4]; t = fp32(fp32(|x_i| / 2^d_i) * R) * 4;
  k = floor(t + 0.5) computed exactly, saturated to 7;
* value = sign(x_i) * (k / 4) * 2^d_i * S (zero keeps the sign of x_i).

Specials: a NaN anywhere in a block makes the whole block NaN. +-Inf clamps S to 49152; the Inf
element gets d = 2 and saturates to k = 7, i.e. +-344064, and the other elements are quantized
with that scale (so values below 6144 in magnitude become +-0).

Packed layout (docs/design.md, bit-order version 1):

* codes: uint8 (rows, Lp/2); nibble = (sign << 3) | k, element 2i in the low nibble, 2i+1 in the
  high nibble; sign is the sign bit of x (so -0 and negative values rounding to 0 give nibble 0x8).
* scales: uint8 (rows, Lp/64, 4) per block:
  byte 0 = E6M2 code (E + 48) << 2 | M, value 2^E * (1 + M/4); code 0xFF (E = 15, M = 3) is NaN;
  byte 1 = E1_8, bit g (LSB first) for elements 8g..8g+7;
  bytes 2-3 = E1_16 little-endian, bit j for elements 4j..4j+3.
* tensor_scale: None.

Specials in the packed form: a NaN block is stored canonically as scale code 0xFF with all E1 bits
and all nibbles 0, and decodes to 64 NaNs. An Inf block needs nothing special: its scale code is
0xFE (49152), the Inf element's E1_8 and E1_16 bits are 1 and its nibble is (sign << 3) | 7, which
decodes to +-7/4 * 4 * 49152 = +-344064; the other elements are +-0 nibbles. So
decode(encode(x)) == fake_quant(x) bit for bit, signed zeros and specials included.

Besides the fake_quant_ref / encode_ref / decode_ref contract of lpq.formats, the module exposes
the block metadata for algorithms: choose_meta_ref (the standard choice above),
fake_quant_with_meta_ref (quantize the elements under given metadata), scale_value (E6M2 code to
float32), scale_code (float32 to E6M2 code) and GRID, the format's `lpq.formats.grid.BlockGrid`
(default metadata, metadata search, rounding onto fixed per-element scales for GPTQ).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lpq.formats.grid import Meta, SearchSpace

BLOCK = 64
C_INV7 = 0.142578125          # bf16(1/7): the toolkit's constant, not 1/7
S_MIN = 2.0 ** -48            # smallest E6M2 value (code 0x00)
S_MAX = 49152.0               # largest finite E6M2 value (code 0xFE)
NAN_CODE = 0xFF


def _check_fmt(fmt: str) -> None:
    if fmt != "hif4":
        raise ValueError(f"hif4 module got format {fmt!r}; it implements only 'hif4'")


def _check_x(x2d: Tensor) -> None:
    if x2d.dim() != 2 or x2d.dtype != torch.float32:
        raise ValueError(f"expected a 2-D float32 tensor, got {x2d.dim()}-D {x2d.dtype}")
    if x2d.shape[1] % BLOCK:
        raise ValueError(f"row length {x2d.shape[1]} is not a multiple of the HiF4 block ({BLOCK})")


def _bf16(t: Tensor) -> Tensor:
    """Round float32 to bfloat16 (nearest even) and back."""
    return t.to(torch.bfloat16).to(torch.float32)


def _pow2(e: Tensor) -> Tensor:
    """2^e as float32 for an integer tensor e in [-126, 127], built from the exponent field (exact
    on every device, unlike pow)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def scale_value(code: Tensor) -> Tensor:
    """float32 value of E6M2 codes (uint8 tensor); 0xFF gives NaN."""
    c = code.to(torch.int32)
    s = _pow2((c >> 2) - 48) * (1.0 + (c & 3).to(torch.float32) / 4)
    return torch.where(c == NAN_CODE, torch.full_like(s, float("nan")), s)


def scale_code(s0: Tensor) -> Tensor:
    """E6M2 code of S0 in [2^-48, 49152] (NaN -> 0xFF): 2 mantissa bits, RNE, with carry."""
    finite = ~torch.isnan(s0)
    s0 = torch.where(finite, s0, torch.ones_like(s0))
    _, e = torch.frexp(s0)                      # s0 = m * 2^e, m in [0.5, 1)
    q = torch.round(s0 * _pow2(3 - e))          # 4 * significand, in [4, 8]; torch.round is RNE
    carry = q == 8
    E = e - 1 + carry.to(e.dtype)
    M = torch.where(carry, torch.zeros_like(q), q - 4).to(torch.int32)
    code = ((E + 48) << 2) | M
    return torch.where(finite, code, torch.full_like(code, NAN_CODE)).to(torch.uint8)


def _reciprocal(s: Tensor) -> Tensor:
    """R = bf16(fp32(1 / S)): the toolkit's bf16 reciprocal (a true float32 division first)."""
    return _bf16(torch.ones_like(s) / s)


def choose_meta_ref(x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The standard HiF4 block metadata of a (rows, Lp) float32 tensor.

    Returns (scale_code uint8 (rows, nblk), e1_8 uint8 0/1 (rows, nblk, 8), e1_16 uint8 0/1
    (rows, nblk, 16)). A block holding a NaN gets scale code 0xFF and all-zero E1 bits.
    """
    _check_x(x2d)
    rows, nblk = x2d.shape[0], x2d.shape[1] // BLOCK
    a = x2d.abs().reshape(rows, nblk, BLOCK)
    A = a.amax(-1)                              # amax propagates NaN: NaN blocks stay NaN
    B = a.reshape(rows, nblk, 8, 8).amax(-1)
    C = a.reshape(rows, nblk, 16, 4).amax(-1)
    s0 = _bf16(A * C_INV7).clamp(S_MIN, S_MAX)
    code = scale_code(s0)
    R = _reciprocal(scale_value(code)).unsqueeze(-1)
    e1_8 = (B * R) >= 4                         # NaN compares false: a NaN block gets zero bits
    e1_16 = (C * R) / _pow2(e1_8.repeat_interleave(2, dim=-1).to(torch.int32)) >= 2
    return code, e1_8.to(torch.uint8), e1_16.to(torch.uint8)


def _check_meta(x2d: Tensor, scale_code: Tensor, e1_8: Tensor, e1_16: Tensor) -> None:
    rows, nblk = x2d.shape[0], x2d.shape[1] // BLOCK
    want = {"scale_code": (rows, nblk), "e1_8": (rows, nblk, 8), "e1_16": (rows, nblk, 16)}
    for name, t in (("scale_code", scale_code), ("e1_8", e1_8), ("e1_16", e1_16)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want[name]}")
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be an integer or bool tensor, got {t.dtype}")
    if scale_code.numel() and (int(scale_code.min()) < 0 or int(scale_code.max()) > NAN_CODE):
        raise ValueError("scale_code values must be E6M2 codes 0..255")
    for name, t in (("e1_8", e1_8), ("e1_16", e1_16)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 1):
            raise ValueError(f"{name} must hold bits (0 or 1)")


def _element_scales(scale_code: Tensor, e1_8: Tensor, e1_16: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per element (rows, Lp): (2^d float32, S float32, R = bf16(1/S) float32) of block metadata."""
    rows = scale_code.shape[0]
    d = (e1_8.to(torch.int32).repeat_interleave(8, dim=-1)
         + e1_16.to(torch.int32).repeat_interleave(4, dim=-1)).reshape(rows, -1)
    S = scale_value(scale_code).repeat_interleave(BLOCK, dim=-1)
    return _pow2(d), S, _reciprocal(S)


def _k(x: Tensor, p: Tensor, R: Tensor) -> Tensor:
    """Element magnitudes k in 0..7 (float32; NaN for NaN x or S) of x under per-element 2^d and R."""
    t = ((x.abs() / p) * R) * 4
    # floor(t + 0.5) exactly: t - floor(t) is exact in float32, unlike t + 0.5. NaN stays NaN;
    # Inf gives Inf (Inf - Inf is NaN, which compares false), and the clamp saturates it to 7.
    fl = torch.floor(t)
    return (fl + (t - fl >= 0.5)).clamp(max=7)


def _round(x: Tensor, p: Tensor, S: Tensor, R: Tensor) -> Tensor:
    """x rounded onto fixed per-element scales (any shape, all four the same shape)."""
    return torch.copysign(_k(x, p, R) * 0.25 * p * S, x)


def fake_quant_with_meta_ref(x2d: Tensor, scale_code: Tensor, e1_8: Tensor, e1_16: Tensor) -> Tensor:
    """Quantize-dequantize (rows, Lp) float32 with externally chosen block metadata.

    scale_code: uint8 E6M2 code per 64-block (rows, nblk); e1_8: bits (rows, nblk, 8); e1_16: bits
    (rows, nblk, 16). Elements follow the standard rules (exact half-away rounding of
    fp32(fp32(|x|/2^d) * R) * 4, saturation at k = 7); a NaN element or a NaN scale (0xFF) gives
    NaN. With choose_meta_ref's metadata this is exactly fake_quant_ref.
    """
    _check_x(x2d)
    _check_meta(x2d, scale_code, e1_8, e1_16)
    return _round(x2d, *_element_scales(scale_code, e1_8, e1_16))


def fake_quant_ref(x2d: Tensor, fmt: str) -> Tensor:
    """HiF4 quantize-dequantize of a (rows, Lp) float32 tensor along its rows; Lp % 64 == 0."""
    _check_fmt(fmt)
    return fake_quant_with_meta_ref(x2d, *choose_meta_ref(x2d))


def _pack_bits(bits: Tensor) -> Tensor:
    """(..., n) 0/1 values -> (..., n // 8) bytes, bit i of each byte from element 8*byte + i."""
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.int32, device=bits.device)
    return (bits.to(torch.int32).reshape(*bits.shape[:-1], bits.shape[-1] // 8, 8) * w).sum(-1).to(torch.uint8)


def _unpack_bits(b: Tensor) -> Tensor:
    """Inverse of _pack_bits: (..., m) bytes -> (..., 8 * m) values 0/1 as int32."""
    sh = torch.arange(8, dtype=torch.int32, device=b.device)
    return ((b.to(torch.int32).unsqueeze(-1) >> sh) & 1).reshape(*b.shape[:-1], 8 * b.shape[-1])


def encode_ref(x2d: Tensor, fmt: str) -> tuple[Tensor, Tensor, None]:
    """(codes uint8 (rows, Lp/2), scales uint8 (rows, Lp/64, 4), None); layout in the module doc."""
    _check_fmt(fmt)
    _check_x(x2d)
    rows, Lp = x2d.shape
    code, e1_8, e1_16 = choose_meta_ref(x2d)
    p, _, R = _element_scales(code, e1_8, e1_16)
    k = _k(x2d, p, R)
    nan_blk = (code == NAN_CODE).repeat_interleave(BLOCK, dim=-1)
    nib = (torch.signbit(x2d).to(torch.int32) << 3) | torch.nan_to_num(k).to(torch.int32)
    nib = torch.where(nan_blk, torch.zeros_like(nib), nib)          # canonical NaN block: nibbles 0
    pairs = nib.reshape(rows, Lp // 2, 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    scales = torch.cat([code.unsqueeze(-1), _pack_bits(e1_8), _pack_bits(e1_16)], dim=-1)
    return codes, scales, None


def decode_ref(codes: Tensor, scales: Tensor | None, tensor_scale: Tensor | None, fmt: str, Lp: int) -> Tensor:
    """float32 (rows, Lp) values of packed HiF4 data (layout in the module doc)."""
    _check_fmt(fmt)
    if tensor_scale is not None:
        raise ValueError("hif4 has no tensor scale; got one")
    if scales is None:
        raise ValueError("hif4 decode needs the block scales; got None")
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"hif4 codes and scales must be uint8, got {codes.dtype} and {scales.dtype}")
    if Lp % BLOCK or codes.dim() != 2 or codes.shape[1] != Lp // 2:
        raise ValueError(f"hif4 codes must be (rows, {Lp // 2}) for Lp={Lp} (a multiple of {BLOCK}), "
                         f"got {tuple(codes.shape)}")
    rows = codes.shape[0]
    if tuple(scales.shape) != (rows, Lp // BLOCK, 4):
        raise ValueError(f"hif4 scales must be {(rows, Lp // BLOCK, 4)}, got {tuple(scales.shape)}")
    c = codes.to(torch.int32)
    nib = torch.stack([c & 0xF, c >> 4], dim=-1).reshape(rows, Lp)
    k = (nib & 7).to(torch.float32)
    sign = torch.where((nib & 8) != 0, -1.0, 1.0)
    d = (_unpack_bits(scales[..., 1:2]).repeat_interleave(8, dim=-1)
         + _unpack_bits(scales[..., 2:4]).repeat_interleave(4, dim=-1)).reshape(rows, Lp)
    S = scale_value(scales[..., 0]).repeat_interleave(BLOCK, dim=-1)
    return torch.copysign(k * 0.25 * _pow2(d) * S, sign)


# ---------------------------------------------------------------------------------------------
# the block grid (lpq.formats.grid.BlockGrid) for PTQ algorithms


@dataclass(frozen=True)
class Hif4Search:
    """Candidates of HiF4 metadata search: the E6M2 codes `scale_steps` grid points away from the
    default scale (clamped to the finite codes), each with the micro-exponents that minimize the
    error for it (`free_micro`) or with the default rule's micro-exponents."""

    scale_steps: tuple[int, ...] = (-2, -1, 0, 1)
    free_micro: bool = True


def _step_code(code: Tensor, step: int) -> Tensor:
    """E6M2 codes `step` grid points away (codes are monotone in value); NaN blocks stay NaN."""
    if step == 0:
        return code
    stepped = (code.to(torch.int32) + step).clamp(0, NAN_CODE - 1).to(torch.uint8)
    return torch.where(code == NAN_CODE, code, stepped)


def _best_micro(xb: Tensor, code: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For fixed scales (rows, nb), the micro-exponents minimizing the w-weighted squared error.

    The choice separates: per 4-group the E1_16 bit given its E1_8 bit, per 8-group the E1_8 bit.
    Returns (e1_8 (rows, nb, 8), e1_16 (rows, nb, 16), error per block (rows, nb))."""
    rows, nb, _ = xb.shape
    S = scale_value(code).unsqueeze(-1).expand(rows, nb, BLOCK)
    R = _reciprocal(S)
    errs = []
    for d in range(3):
        q = _round(xb, torch.full_like(xb, float(2 ** d)), S, R)
        errs.append(((q - xb) ** 2 * w).view(rows, nb, 16, 4).sum(-1))
    e4 = torch.stack(errs)                                                  # (3, rows, nb, 16)
    best0, arg0 = torch.minimum(e4[0], e4[1]), e4[1] < e4[0]                # E1_8 = 0: d in {0, 1}
    best1, arg1 = torch.minimum(e4[1], e4[2]), e4[2] < e4[1]                # E1_8 = 1: d in {1, 2}
    g0 = best0.view(rows, nb, 8, 2).sum(-1)
    g1 = best1.view(rows, nb, 8, 2).sum(-1)
    e1_8 = g1 < g0
    e1_16 = torch.where(e1_8.repeat_interleave(2, -1), arg1, arg0)
    return e1_8.to(torch.uint8), e1_16.to(torch.uint8), torch.minimum(g0, g1).sum(-1)


class Hif4Grid:
    fmt = "hif4"
    block = BLOCK
    default_space = Hif4Search()
    only_default = Hif4Search((0,), free_micro=False)

    def default_meta(self, x2d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return choose_meta_ref(x2d)

    def element_scales(self, meta: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return _element_scales(*meta)

    def round(self, x: Tensor, scales: tuple[Tensor, ...]) -> Tensor:
        return _round(x, *scales)

    def search_meta(self, x2d: Tensor, importance: Tensor | None = None,
                    space: Hif4Search | None = None) -> tuple[Tensor, Tensor, Tensor]:
        space = space or self.default_space
        _check_x(x2d)
        rows, L = x2d.shape
        xb = x2d.view(rows, L // BLOCK, BLOCK)
        w = (torch.ones(L) if importance is None else importance.float()).view(1, L // BLOCK, BLOCK)
        code0, e8_0, e16_0 = choose_meta_ref(x2d)
        best: list[Tensor] | None = None
        for step in space.scale_steps:
            code = _step_code(code0, step)
            if space.free_micro:
                e8, e16, err = _best_micro(xb, code, w)
            else:
                e8, e16 = e8_0, e16_0
                q = _round(x2d, *_element_scales(code, e8, e16))
                err = ((q - x2d) ** 2 * w.view(1, L)).view(rows, L // BLOCK, BLOCK).sum(-1)
            if best is None:
                best = [err, code, e8, e16]
                continue
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, code, best[1]),
                    torch.where(better.unsqueeze(-1), e8, best[2]), torch.where(better.unsqueeze(-1), e16, best[3])]
        return best[1], best[2], best[3]


GRID = Hif4Grid()


def grid(fmt: str) -> Hif4Grid | None:
    return GRID if fmt == "hif4" else None
