"""HiFloat8: golden vectors, the code table, specials, cpp == ref, encode/decode, bad input."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lpq.formats import Packed, decode, encode, fake_quant
from lpq.formats._build import load_kernel
from lpq.formats.hif8 import code_fields, decode_ref, decode_table, encode_ref, fake_quant_ref
from tests.formats.vectors import INT_OF, assert_same_bits, vector_path

BACKENDS = ["ref", "cpp"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(vector_path(name)) as d:
        return {k: d[k] for k in d.files}


def spec_oracle(x: np.ndarray) -> np.ndarray:
    """formats.md §1.4 written out literally in float64 (independent of lpq's bit tricks)."""
    with np.errstate(all="ignore"):                      # signalling NaNs; Inf and NaN are masked below
        x64 = x.astype(np.float64)
        a = np.abs(x64)
        e = np.frexp(a)[1].astype(np.int64) - 1          # floor(log2 a), exact
        e = np.where(e == -23, -22, e)
        ae = np.abs(e)
        m = np.select([ae <= 3, ae <= 7, ae <= 15], [3, 2, 1], 0)
        y = np.ldexp(np.floor(np.ldexp(a, m - e) + 0.5), e - m)
    y = np.where(a >= 40960, np.inf, y)
    y = np.where(a < 2.0 ** -23, 0.0, y)
    y = np.where((x64 < 0) & (y != 0), -y, y)
    y = np.where(np.isnan(x64), np.nan, y)
    return y.astype(np.float32)


def _oracle(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(spec_oracle(x.float().numpy())).to(x.dtype)


def _all_16bit(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)


# ---------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_all_values_and_codes(backend):
    d = _npz("hif8_fp16_all.npz")
    x, want = torch.from_numpy(d["input"]), torch.from_numpy(d["output"])
    assert_same_bits(fake_quant(x, "hif8", backend=backend), want)
    # every HiF8 value is an fp16 value, so the fp16 path must give the same numbers
    assert_same_bits(fake_quant(x.half(), "hif8", backend=backend), want.half())
    p = encode(x, "hif8", backend=backend)
    assert p.scales is None and p.tensor_scale is None
    assert p.codes.dtype == torch.uint8 and p.codes.shape == (1, x.numel())
    assert torch.equal(p.codes[0], torch.from_numpy(d["output_code"]))
    assert_same_bits(decode(p, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_all_256_codes(backend):
    want = torch.from_numpy(_npz("hif8_fp16_all.npz")["decode_table"])
    assert_same_bits(decode_table(), want)
    p = Packed("hif8", (256,), 0, torch.arange(256, dtype=torch.uint8).reshape(1, 256), None, None)
    assert_same_bits(decode(p, backend=backend), want.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_all_values(backend):
    d = _npz("hif8_bf16_all.npz")
    x, want = torch.from_numpy(d["input"]), torch.from_numpy(d["output"])
    assert_same_bits(fake_quant(x, "hif8", backend=backend), want)
    assert_same_bits(fake_quant(x.bfloat16(), "hif8", backend=backend), want.bfloat16())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_edges(backend):
    d = _npz("hif8_fp32_edges.npz")
    x = torch.from_numpy(d["input"]).reshape(10, -1)   # 2-D, quantized along both axes
    want = torch.from_numpy(d["output"]).reshape(10, -1)
    assert_same_bits(fake_quant(x, "hif8", backend=backend), want)
    assert_same_bits(fake_quant(x, "hif8", axis=0, backend=backend), want)
    assert_same_bits(decode(encode(x, "hif8", axis=0, backend=backend), backend=backend), want)


def test_code_fields_match_code_table_csv():
    with open(vector_path("hif8_code_table.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 256
    key_of = {"sign": "sign", "dot_bits": "dot", "D": "D", "exp_field_bits": "exp_field",
              "exponent": "exponent", "mantissa_bits": "mantissa_bits", "mantissa_field": "mantissa"}
    for row in rows:
        code = int(row["code_hex"], 16)
        got = code_fields(code)
        for col, key in key_of.items():
            assert str("" if got[key] is None else got[key]) == row[col], (hex(code), col)
        want = float(row["value"])
        assert (math.isnan(got["value"]) and math.isnan(want)) or got["value"] == want, hex(code)


def test_positive_values():
    lines = vector_path("hif8_positive_values.txt").read_text().splitlines()
    want = np.array([float(s) for s in lines if s.strip() and not s.startswith("#")])
    t = decode_table().numpy()
    got = np.sort(t[np.isfinite(t) & (t > 0)])
    assert got.size == 126
    assert np.array_equal(got, want)
    assert np.array_equal(got, _npz("hif8_fp16_all.npz")["positive_values"])


# ---------------------------------------------------------------- hand-built codes and values

WORKED = {0x10: 2.0, 0x18: 0.5, 0x28: 8.0, 0x38: 0.125, 0x40: 16.0, 0x50: 0.0625, 0x60: 256.0,
          0x6E: 32768.0, 0x70: 2.0 ** -8, 0x7E: 2.0 ** -15, 0x7F: 1.5 * 2.0 ** -15, 0x01: 2.0 ** -22,
          0x07: 2.0 ** -16, 0x08: 1.0, 0x09: 1.125}


def test_code_fields_examples():
    assert code_fields(0x10) == dict(sign=0, dot="001", D=1, exp_field="0", exponent=1, mantissa_bits=3,
                                     mantissa="000", value=2.0)
    assert code_fields(0xE5) == dict(sign=1, dot="11", D=4, exp_field="0010", exponent=10, mantissa_bits=1,
                                     mantissa="1", value=-1536.0)
    assert code_fields(0x53)["exponent"] == -4 and code_fields(0x53)["value"] == 1.75 * 2.0 ** -4
    assert code_fields(0x05)["D"] == "DML" and code_fields(0x05)["value"] == 2.0 ** -18
    assert code_fields(0x00)["value"] == 0.0 and math.isnan(code_fields(0x80)["value"])
    assert code_fields(0x6F)["value"] == math.inf and code_fields(0xEF)["value"] == -math.inf
    for code, value in WORKED.items():
        assert code_fields(code)["value"] == value
        assert code_fields(code | 0x80)["value"] == -value
    for bad in (-1, 256, 1.0, True):
        with pytest.raises(ValueError, match="HiF8 code"):
            code_fields(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_examples_encode_and_decode(backend):
    codes = torch.tensor(list(WORKED) + [c | 0x80 for c in WORKED], dtype=torch.uint8)
    values = torch.tensor(list(WORKED.values()) + [-v for v in WORKED.values()], dtype=torch.float32)
    p = encode(values, "hif8", backend=backend)
    assert torch.equal(p.codes[0], codes)
    assert_same_bits(decode(p, backend=backend), values)


# (input, expected output): formats.md §1.4 consequences and §6 pitfalls 4-6
ROUNDING = [
    (2.0 ** -23, 2.0 ** -22),                   # tie between 0 and 2^-22 goes away from zero
    (1.5 * 2.0 ** -23, 2.0 ** -22),
    (float(np.nextafter(np.float32(2.0 ** -23), np.float32(0))), 0.0),
    (-(2.0 ** -23), -(2.0 ** -22)),
    (15.5, 16.0),
    (1.0625, 1.125),
    (-1.0625, -1.125),
    (0.96875, 1.0),
    (1.03125, 1.0),                               # below the tie: down
    (3.0 * 2.0 ** -19, 2.0 ** -17),             # denormal tie between 2^-18 and 2^-17
    (32768.0, 32768.0),
    (40959.99609375, 32768.0),                  # [32768, 40960) -> 32768, not Inf
    (40960.0, math.inf),
    (-40960.0, -math.inf),
    (49152.0, math.inf),
    (3.4e38, math.inf),
    (1e-30, 0.0),
    (-1e-30, 0.0),                              # tiny negatives become +0
    (-0.0, 0.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_edges(backend):
    x = torch.tensor([a for a, _ in ROUNDING], dtype=torch.float32)
    want = torch.tensor([b for _, b in ROUNDING], dtype=torch.float32)
    assert_same_bits(fake_quant(x, "hif8", backend=backend), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_specials(backend, dtype):
    # Python floats go through the dtype first, so -1e-9 stays a tiny negative only where it can
    x = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, -1e-9, 1e-9, 50000.0, -50000.0],
                     dtype=dtype)
    y = fake_quant(x, "hif8", backend=backend)
    assert y.dtype == dtype
    assert torch.isnan(y[:2]).all()
    assert y[2].item() == math.inf and y[3].item() == -math.inf
    assert (y[4:8].view(INT_OF[dtype]) == 0).all(), "zeros and tiny values must become +0 (no -0)"
    assert y[8].item() == math.inf and y[9].item() == -math.inf
    p = encode(x, "hif8", backend=backend)
    assert p.codes[0].tolist() == [0x80, 0x80, 0x6F, 0xEF, 0, 0, 0, 0, 0x6F, 0xEF]
    assert_same_bits(decode(p, backend=backend), y.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_and_empty(backend):
    assert fake_quant(torch.tensor(15.5), "hif8", backend=backend).item() == 16.0
    p = encode(torch.tensor(-0.96875, dtype=torch.bfloat16), "hif8", backend=backend)
    assert p.codes.shape == (1, 1) and p.codes.item() == 0x88
    assert decode(p, backend=backend).item() == -1.0 and decode(p, backend=backend).shape == ()
    empty = torch.empty(0, 5)
    assert fake_quant(empty, "hif8", backend=backend).shape == (0, 5)
    assert decode(encode(empty, "hif8", backend=backend), backend=backend).shape == (0, 5)


# ---------------------------------------------------------------- cpp == ref == the spec, exhaustively

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_pattern(dtype):
    x = _all_16bit(dtype)                      # includes every NaN, Inf, -0 and subnormal
    ref = fake_quant(x, "hif8", backend="ref")
    assert_same_bits(ref, _oracle(x))
    assert_same_bits(fake_quant(x, "hif8", backend="cpp"), ref)
    pr, pc = encode(x, "hif8", backend="ref"), encode(x, "hif8", backend="cpp")
    assert torch.equal(pr.codes, pc.codes)
    assert_same_bits(decode(pc, backend="cpp"), fake_quant(x.float(), "hif8", backend="ref"))


def test_random_fp32_bit_patterns():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2 ** 31, 2 ** 31, (64, 4099), generator=g, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)                   # every exponent, NaN payloads, subnormals
    ref = fake_quant(x, "hif8", backend="ref")
    assert_same_bits(ref, _oracle(x))
    assert_same_bits(fake_quant(x, "hif8", backend="cpp"), ref)
    assert torch.equal(encode(x, "hif8", backend="cpp").codes, encode(x, "hif8", backend="ref").codes)


# ---------------------------------------------------------------- hypothesis: cpp == ref on random shapes

def _interesting() -> np.ndarray:
    """HiF8 values, the midpoints between them (ties) and the thresholds, each with its float32
    neighbours: where the rounding decisions are made."""
    t = decode_table().numpy()
    pos = np.sort(t[np.isfinite(t) & (t > 0)])
    base = np.concatenate([pos, (pos[1:] + pos[:-1]) / 2, [2.0 ** -23, 40960.0, 49152.0, 65536.0]])
    f = base.astype(np.float32)
    return np.concatenate([f, np.nextafter(f, np.float32(0)), np.nextafter(f, np.float32(np.inf))])


INTERESTING = _interesting()
elements = st.one_of(
    st.floats(width=32),                                         # NaN, Inf, -0, subnormals, extremes
    st.builds(lambda m, e, s: float(np.float32(s * math.ldexp(m, e))),
              st.floats(0.5, 1.0, exclude_max=True, width=32), st.integers(-30, 20), st.sampled_from([1.0, -1.0])),
    st.sampled_from(INTERESTING.tolist()).map(float),
    st.builds(lambda v: -v, st.sampled_from(INTERESTING.tolist())),
)


@st.composite
def tensors(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    if draw(st.booleans()):                                      # one long odd axis
        i = draw(st.integers(0, len(shape) - 1))
        shape = shape[:i] + (draw(st.integers(10, 41)),) + shape[i + 1:]
    picked = draw(hnp.arrays(np.float32, shape, elements=elements))
    # hypothesis fills most of a large array with one value; mix in a random background that
    # spans 2^-32 .. 2^21 with NaN/Inf/-0 sprinkled in
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    background = (rng.choice([-1.0, 1.0], shape) * rng.uniform(1, 2, shape)
                  * np.exp2(rng.integers(-32, 21, shape))).astype(np.float32)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=np.float32)
    background = np.where(rng.random(shape) < 0.02, rng.choice(specials, shape), background)
    arr = np.where(rng.random(shape) < 0.5, picked, background).astype(np.float32)
    dtype = draw(st.sampled_from(DTYPES))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.from_numpy(arr).to(dtype)
    if draw(st.booleans()):                                      # a non-contiguous view
        x = x.transpose(0, -1)
    return x, axis


@settings(max_examples=60, deadline=None)
@given(tensors())
def test_cpp_matches_ref_property(case):
    x, axis = case
    ref = fake_quant(x, "hif8", axis, backend="ref")
    assert ref.shape == x.shape and ref.dtype == x.dtype
    assert_same_bits(fake_quant(x, "hif8", axis, backend="cpp"), ref)
    assert_same_bits(ref, _oracle(x))
    want = fake_quant(x.float(), "hif8", axis, backend="ref")
    pr, pc = encode(x, "hif8", axis, backend="ref"), encode(x, "hif8", axis, backend="cpp")
    assert torch.equal(pr.codes, pc.codes) and pc.scales is None and pc.tensor_scale is None
    for p in (pr, pc):
        for backend in BACKENDS:
            assert_same_bits(decode(p, backend=backend), want)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_public_api(backend):
    with pytest.raises(TypeError, match="floating-point"):
        fake_quant(torch.arange(6), "hif8", backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        encode(torch.arange(6), "hif8", backend=backend)
    with pytest.raises(ValueError, match="axis 2 out of range"):
        fake_quant(torch.ones(2, 3), "hif8", axis=2, backend=backend)
    with pytest.raises(ValueError, match="unknown format 'hif9'"):
        fake_quant(torch.ones(3), "hif9", backend=backend)
    with pytest.raises(ValueError, match="unknown format"):
        encode(torch.ones(3), "HIF8", backend=backend)


def test_kernel_rejects_bad_input():
    ext = load_kernel("hif8")
    x = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="unknown format 'mxfp4'"):
        ext.fake_quant(x, "mxfp4", torch.empty_like(x))
    with pytest.raises(RuntimeError, match="expected a 2-D"):
        ext.fake_quant(torch.ones(2, 3, 4), "hif8", torch.empty(2, 3, 4))
    with pytest.raises(RuntimeError, match="expected float32, bfloat16 or float16"):
        ext.encode(torch.ones(2, 3, dtype=torch.float64), "hif8")
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.encode(torch.ones(3, 2).t(), "hif8")
    with pytest.raises(RuntimeError, match="out must be"):
        ext.fake_quant(x, "hif8", torch.empty(2, 3, dtype=torch.bfloat16))
    codes = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="no scales"):
        ext.decode(codes, torch.zeros(2, 3, dtype=torch.uint8), None, "hif8", 3)
    with pytest.raises(RuntimeError, match="expected Lp = 4"):
        ext.decode(codes, None, None, "hif8", 4)
    with pytest.raises(RuntimeError, match="uint8"):
        ext.decode(codes.int(), None, None, "hif8", 3)


def test_reference_rejects_bad_input():
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="only 'hif8'"):
        fake_quant_ref(x, "mxfp4")
    with pytest.raises(TypeError, match="2-D float32"):
        encode_ref(x.double(), "hif8")
    codes = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no scales"):
        decode_ref(codes, None, torch.tensor(1.0), "hif8", 3)
    with pytest.raises(ValueError, match="uint8"):
        decode_ref(codes, None, None, "hif8", 4)
