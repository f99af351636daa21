"""HiFloat8 (HiF8) reference numerics in plain PyTorch (formats.md §1, toolkit HiFloat8 @ fb5bea0).

Quantization (formats.md §1.4), per element:
  * NaN -> NaN, ±Inf -> ±Inf;
  * |x| >= 40960 -> ±Inf (overflow to infinity, not saturation);
  * |x| < 2^-23 -> +0 (also -0 and tiny negatives: HiF8 has no -0, 0x80 is NaN);
  * otherwise e = floor(log2|x|), e = -23 -> -22, m = 3 / 2 / 1 / 0 mantissa bits for
    |e| <= 3 / <= 7 / <= 15 / else (the denormals), and
    y = sign(x) * floor(|x| * 2^(m-e) + 0.5) * 2^(e-m): round half away from zero ("TA").

The arithmetic is exact integer work on the float32 bit pattern: the exponent field is
floor(log2|x|), and adding half an ulp at width m to the magnitude bits then clearing the dropped
bits is floor(|x| * 2^(m-e) + 0.5) * 2^(e-m) (a carry into the exponent gives 2^(e+1), the right
answer). Integer ops keep it exact and fast on any device.

Packed layout (docs/design.md, bit-order version 1), block size 1:
  * codes: uint8 (rows, Lp), one HiF8 code per value (Lp == L, nothing is padded);
  * scales: None; tensor_scale: None.
A code is `S | dot | exponent | mantissa` from the MSB (formats.md §1.1): zero is 0x00, NaN 0x80,
+Inf 0x6F, -Inf 0xEF; the encoder never emits 0x80 for a zero.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

FMT = "hif8"
NAN_CODE = 0x80
POS_INF_CODE = 0x6F
NEG_INF_CODE = 0xEF

# float32 bit patterns
_ABS = 0x7FFFFFFF
_SIGN = -(2 ** 31)          # 0x80000000 as int32
_INF = 0x7F800000
_OVERFLOW = 0x47200000      # 40960 = 1.25 * 2^15, the midpoint between 32768 and the Inf slot 49152
_UNDERFLOW = 0x34000000     # 2^-23: below it the result is +0
_MIN_VALUE = 0x34800000     # 2^-22, the smallest nonzero HiF8 value

# (dot bits, dot prefix) -> D, the number of exponent bits; None is denormal mode ("DML")
_DOT = {(2, 0b11): 4, (2, 0b10): 3, (2, 0b01): 2, (3, 0b001): 1, (4, 0b0001): 0, (4, 0b0000): None}


def _check_fmt(fmt: str) -> None:
    if fmt != FMT:
        raise ValueError(f"hif8 module got format {fmt!r}; it implements only {FMT!r}")


def _check_x2d(x2d: Tensor, fn: str) -> None:
    if x2d.dtype != torch.float32 or x2d.dim() != 2:
        raise TypeError(f"hif8 {fn} expects a 2-D float32 tensor, got {x2d.dim()}-D {x2d.dtype}")


def code_fields(code: int) -> dict:
    """Fields of one HiF8 code, read with the bit rules of formats.md §1.1/§1.3.

    Keys: sign (0/1), dot (the dot prefix as a bit string), D (number of exponent bits, or "DML" in
    denormal mode), exp_field (exponent bits as a string, "" when D is 0 or DML), exponent (e, or
    M - 23 for a denormal; None for zero and NaN), mantissa_bits (width of the mantissa field),
    mantissa (the mantissa field as a bit string), value (float; ±inf, nan included).
    """
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFF:
        raise ValueError(f"a HiF8 code is an int in [0, 255], got {code!r}")
    sign = code >> 7
    rest = code & 0x7F                       # the 7 bits after the sign
    # the dot field is a prefix code: 2 bits unless they are 00, then 3 unless 000, then 4
    dot_bits = 2 if rest >= 0x20 else 3 if rest >= 0x10 else 4
    prefix = rest >> (7 - dot_bits)
    D = _DOT[(dot_bits, prefix)]
    mbits = 7 - dot_bits - (D or 0)
    mant = rest & ((1 << mbits) - 1)
    fields = dict(sign=sign, dot=format(prefix, f"0{dot_bits}b"), D="DML" if D is None else D,
                  exp_field="", mantissa_bits=mbits, mantissa=format(mant, f"0{mbits}b"))
    s = -1.0 if sign else 1.0
    if D is None:                            # denormal: 2^(M-23); M = 0 is zero (S=0) or NaN (S=1)
        if mant == 0:
            return dict(fields, exponent=None, value=float("nan") if sign else 0.0)
        return dict(fields, exponent=mant - 23, value=s * 2.0 ** (mant - 23))
    exp_field = (rest >> mbits) & ((1 << D) - 1)
    if D == 0:
        e = 0
    else:                                    # sign-magnitude exponent with an implicit leading 1
        mag = (1 << (D - 1)) + (exp_field & ((1 << (D - 1)) - 1))
        e = -mag if exp_field >> (D - 1) else mag
        fields["exp_field"] = format(exp_field, f"0{D}b")
    if e == 15 and mant == 1:                # the slot of 1.5 * 2^15 holds infinity
        value = s * float("inf")
    else:
        value = s * (1.0 + mant / (1 << mbits)) * 2.0 ** e
    return dict(fields, exponent=e, value=value)


@lru_cache(maxsize=1)
def _decode_table() -> Tensor:
    return torch.tensor([code_fields(c)["value"] for c in range(256)], dtype=torch.float64)


def decode_table() -> Tensor:
    """The 256 HiF8 values (float64), index = code."""
    return _decode_table().clone()


@lru_cache(maxsize=1)
def _encode_tables() -> tuple[Tensor, Tensor]:
    """Indexed by the float32 exponent field of a HiF8 value: the positive code with mantissa
    field 0, and the right shift that turns the float32 mantissa into the code's mantissa field.

    Inverted from code_fields, so encode and decode share one reading of the bit rules. Field 0
    (zero) gives code 0; field 255 (Inf) gives 0x6F; NaN is handled by the caller.
    """
    base = torch.zeros(256, dtype=torch.int32)
    shift = torch.full((256,), 23, dtype=torch.int32)
    for c in range(1, 0x80):
        f = code_fields(c)
        if f["D"] == "DML" or int(f["mantissa"], 2) == 0:
            field = f["exponent"] + 127
            base[field] = c
            if f["D"] != "DML":               # a denormal's field is its exponent: no fraction bits
                shift[field] = 23 - f["mantissa_bits"]
    base[255] = POS_INF_CODE
    return base, shift


def _quantize_bits(x: Tensor) -> Tensor:
    """int32 bit patterns of the HiF8 values of float32 x (see the module docstring)."""
    u = x.view(torch.int32)
    mag = u & _ABS
    # [2^-23, 2^-22) all become 2^-22 (the spec's e = -23 -> -22): lifting them first lets the
    # rounding below produce that; the upper clamp keeps the int32 add from overflowing (those
    # elements become Inf below anyway).
    lifted = mag.clamp(_MIN_VALUE, _OVERFLOW)
    ae = ((lifted >> 23) - 127).abs_()
    drop = (ae >= 4).int().add_(20).add_(ae >= 8).add_(ae >= 16)     # 23 - m
    r = (lifted.add_(1 << (drop - 1)) >> drop) << drop
    sign = u & _SIGN
    r |= sign
    r = torch.where(mag < _UNDERFLOW, 0, r)                            # +0, never -0
    r = torch.where(mag >= _OVERFLOW, sign | _INF, r)
    return torch.where(mag > _INF, u, r)                              # NaN passes through


def fake_quant_ref(x2d: Tensor, fmt: str) -> Tensor:
    """HiF8 quantize-dequantize of a float32 (rows, Lp) tensor; float32 result."""
    _check_fmt(fmt)
    _check_x2d(x2d, "fake_quant_ref")
    return _quantize_bits(x2d).view(torch.float32)


def encode_ref(x2d: Tensor, fmt: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(codes uint8 (rows, Lp), None, None): the HiF8 code of each quantized value."""
    _check_fmt(fmt)
    _check_x2d(x2d, "encode_ref")
    y = _quantize_bits(x2d)
    base, shift = (t.to(y.device) for t in _encode_tables())
    field = ((y >> 23) & 0xFF).long()
    code = ((y >> 24) & 0x80) | base[field] | ((y & 0x7FFFFF) >> shift[field])
    code = torch.where((y & _ABS) > _INF, NAN_CODE, code)
    return code.to(torch.uint8), None, None


def decode_ref(codes: Tensor, scales: Tensor | None, tensor_scale: Tensor | None, fmt: str,
               Lp: int) -> Tensor:
    """float32 (rows, Lp) values of HiF8 codes (uint8 (rows, Lp)); scales and tensor_scale are None."""
    _check_fmt(fmt)
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != Lp:
        raise ValueError(f"hif8 codes must be uint8 (rows, {Lp}), got {codes.dtype} {tuple(codes.shape)}")
    if scales is not None or tensor_scale is not None:
        raise ValueError("hif8 has no scales: scales and tensor_scale must be None")
    return _decode_table().to(device=codes.device, dtype=torch.float32)[codes.long()]
