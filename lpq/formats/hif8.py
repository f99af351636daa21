"""HiFloat8 (HiF8) reference numerics in plain PyTorch (formats.md §1, toolkit HiFloat8 @ fb5bea0).

Quantization (formats.md §1.4), per element:
  * NaN -> NaN, ±Inf -> ±Inf;
  * |x| >= 40960 -> ±Inf (overflow to infinity, not saturation);
  * |x| < 2^-23 -> +0 (also -0 and tiny negatives: HiF8 has no -0, 0x80 is NaN);
  * otherwise e = floor(log2|x|) (taken from the float bits, never log2), e = -23 -> -22,
    m = 3 / 2 / 1 / 0 mantissa bits for |e| <= 3 / <= 7 / <= 15 / else (denormals),
    y = sign(x) * floor(|x| * 2^(m-e) + 0.5) * 2^(e-m): round half away from zero ("TA").

Packed layout (docs/design.md, bit-order version 1): block size 1, so
  * codes: uint8 (rows, Lp), one HiF8 code per value, Lp == L;
  * scales: None; tensor_scale: None.
A code is `S | dot | exponent | mantissa` from the MSB (formats.md §1.1): zero is 0x00, NaN 0x80,
+Inf 0x6F, -Inf 0xEF; the encoder never emits 0x80 for a zero.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

FMT = "hif8"
OVERFLOW = 40960.0          # 1.25 * 2^15: midpoint between 32768 and the Inf slot 49152
UNDERFLOW = 2.0 ** -23      # below this the result is +0; exactly 2^-23 rounds away to 2^-22
NAN_CODE = 0x80
POS_INF_CODE = 0x6F
NEG_INF_CODE = 0xEF
_E_MIN, _E_MAX = -22, 15    # exponents of the finite nonzero values (denormals included)

# (dot bits, dot prefix) -> D; None means denormal mode ("DML")
_DOT = {(2, 0b11): 4, (2, 0b10): 3, (2, 0b01): 2, (3, 0b001): 1, (4, 0b0001): 0, (4, 0b0000): None}


def _check_fmt(fmt: str) -> None:
    if fmt != FMT:
        raise ValueError(f"hif8 module got format {fmt!r}; it implements only {FMT!r}")


def code_fields(code: int) -> dict:
    """Fields of one HiF8 code, read with the bit rules of formats.md §1.1/§1.3.

    Keys mirror vectors/hif8_code_table.csv: sign, dot_bits (str), D (int, or "DML" in denormal
    mode), exp_field_bits (str, "" when D is 0 or DML), exponent (int, None for zero and NaN),
    mantissa_bits, mantissa_field (str), value (float).
    """
    if not isinstance(code, int) or not 0 <= code <= 0xFF:
        raise ValueError(f"a HiF8 code is an int in [0, 255], got {code!r}")
    sign = code >> 7
    rest = code & 0x7F                       # 7 bits after the sign
    # the dot field is a prefix code: 2 bits unless they are 00, then 3 unless 000, then 4
    dot_bits = 2 if rest >= 0x20 else 3 if rest >= 0x10 else 4
    prefix = rest >> (7 - dot_bits)
    D = _DOT[(dot_bits, prefix)]
    mbits = 7 - dot_bits - (D or 0)
    mant = rest & ((1 << mbits) - 1)
    mant_str = format(mant, f"0{mbits}b")
    s = -1.0 if sign else 1.0
    if D is None:                            # denormal: 2^(M-23), M = 0 is zero (S=0) or NaN (S=1)
        if mant == 0:
            return dict(sign=sign, dot_bits="0000", D="DML", exp_field_bits="", exponent=None,
                        mantissa_bits=mbits, mantissa_field=mant_str,
                        value=float("nan") if sign else 0.0)
        return dict(sign=sign, dot_bits="0000", D="DML", exp_field_bits="", exponent=mant - 23,
                    mantissa_bits=mbits, mantissa_field=mant_str, value=s * 2.0 ** (mant - 23))
    exp_field = (rest >> mbits) & ((1 << D) - 1)
    if D == 0:
        e = 0
    else:                                    # sign-magnitude exponent with an implicit leading 1
        mag = (1 << (D - 1)) + (exp_field & ((1 << (D - 1)) - 1))
        e = -mag if exp_field >> (D - 1) else mag
    if e == _E_MAX and mant == 1:            # the slot of 1.5 * 2^15 holds infinity
        value = s * float("inf")
    else:
        value = s * (1.0 + mant / (1 << mbits)) * 2.0 ** e
    return dict(sign=sign, dot_bits=format(prefix, f"0{dot_bits}b"), D=D,
                exp_field_bits=format(exp_field, f"0{D}b") if D else "", exponent=e,
                mantissa_bits=mbits, mantissa_field=mant_str, value=value)


@lru_cache(maxsize=1)
def _decode_table() -> Tensor:
    return torch.tensor([code_fields(c)["value"] for c in range(256)], dtype=torch.float64)


def decode_table() -> Tensor:
    """The 256 HiF8 values (float64), index = code."""
    return _decode_table().clone()


@lru_cache(maxsize=1)
def _encode_tables() -> tuple[Tensor, Tensor]:
    """For e in [-22, 15]: the positive code with mantissa field 0, and the mantissa width.

    Inverted from the decoder so encode and decode share one reading of the bit rules.
    """
    base = torch.zeros(_E_MAX - _E_MIN + 1, dtype=torch.int64)
    mbits = torch.zeros_like(base)
    for c in range(1, 0x80):
        f = code_fields(c)
        if int(f["mantissa_field"], 2) == 0 or f["D"] == "DML":
            i = f["exponent"] - _E_MIN
            # in denormal mode the whole 3-bit field is the exponent: no fraction bits
            base[i], mbits[i] = c, 0 if f["D"] == "DML" else f["mantissa_bits"]
    return base, mbits


def _pow2(k: Tensor) -> Tensor:
    """2^k as float64, exact, built from the exponent bits (k integer, within the normal range)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _floor_log2(a: Tensor) -> Tensor:
    """floor(log2 a) for positive finite float64 a, exact (frexp reads the bits)."""
    return torch.frexp(a)[1].to(torch.int64) - 1


def _quantize(x: Tensor) -> Tensor:
    """HiF8 values of float32 x (float32), exact: float64 holds every intermediate exactly."""
    a = x.abs().double()
    finite_nonzero = torch.isfinite(a) & (a > 0)
    a_safe = torch.where(finite_nonzero, a, torch.ones_like(a))
    e = _floor_log2(a_safe)
    e = torch.where(e == -23, -22, e)
    ae = e.abs()
    m = 3 - (ae >= 4).long() - (ae >= 8).long() - (ae >= 16).long()
    # a * 2^(m-e) < 2^(m+1) <= 16 has at most 24 significant bits: + 0.5 and floor are exact.
    y = torch.floor(a_safe * _pow2(m - e) + 0.5) * _pow2(e - m)
    y = torch.where(a >= OVERFLOW, torch.inf, y)
    y = torch.where(a < UNDERFLOW, 0.0, y)
    y = torch.where((x < 0) & (y != 0), -y, y)   # no -0: tiny negatives become +0
    return torch.where(torch.isnan(x), x.double(), y).float()


def fake_quant_ref(x2d: Tensor, fmt: str) -> Tensor:
    """HiF8 quantize-dequantize of a float32 (rows, Lp) tensor; float32 result."""
    _check_fmt(fmt)
    if x2d.dtype != torch.float32 or x2d.dim() != 2:
        raise TypeError(f"fake_quant_ref expects a 2-D float32 tensor, got {x2d.dim()}-D {x2d.dtype}")
    return _quantize(x2d)


def encode_ref(x2d: Tensor, fmt: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(codes uint8 (rows, Lp), None, None): the HiF8 code of each quantized value."""
    _check_fmt(fmt)
    if x2d.dtype != torch.float32 or x2d.dim() != 2:
        raise TypeError(f"encode_ref expects a 2-D float32 tensor, got {x2d.dim()}-D {x2d.dtype}")
    y = _quantize(x2d)
    a = y.abs().double()
    finite_nonzero = torch.isfinite(a) & (a > 0)
    a_safe = torch.where(finite_nonzero, a, torch.ones_like(a))
    e = _floor_log2(a_safe)
    base, mbits = (t.to(y.device) for t in _encode_tables())
    i = (e - _E_MIN).clamp(0, _E_MAX - _E_MIN)
    m = mbits[i]
    frac = ((a_safe * _pow2(-e) - 1.0) * _pow2(m)).long()    # exact: y has at most m fraction bits
    code = base[i] + frac
    code = torch.where(y < 0, code | 0x80, code)
    code = torch.where(y == 0, 0, code)
    code = torch.where(torch.isinf(y), torch.where(y > 0, POS_INF_CODE, NEG_INF_CODE), code)
    code = torch.where(torch.isnan(y), NAN_CODE, code)
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
