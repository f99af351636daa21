"""HiFloat4: golden vectors (values and block metadata), specials, cpp == ref, packing, bad input."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpq.formats import Packed, decode, encode, fake_quant
from lpq.formats.hif4 import (choose_meta_ref, fake_quant_ref, fake_quant_with_meta_ref, scale_value)
from tests.formats.vectors import assert_same_bits, load_cases

BACKENDS = ["ref", "cpp"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


CASES = ["normal_4x64", "normal_3x128", "heavy_4x64", "heavy_3x128", "bf16_4x64", "ties_2x64",
         "fp32trap_1x64", "log2trap_2x64", "edge_5x100", "special_2x64"]


def n_bit_differences(actual: torch.Tensor, expected: torch.Tensor) -> int:
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    return int(((actual.view(torch.int32) != expected.view(torch.int32)) & ~both_nan).sum())


def _padded(x: torch.Tensor) -> torch.Tensor:
    L = x.shape[1]
    return torch.nn.functional.pad(x, (0, -(-L // 64) * 64 - L))


def unpack_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E6M2 code, E1_8 bits (..., 8), E1_16 bits (..., 16)) from the packed (rows, nblk, 4) bytes."""
    s = scales.to(torch.int32)
    e8 = (s[..., 1:2] >> torch.arange(8, dtype=torch.int32)) & 1
    e16 = ((s[..., 2:3] | (s[..., 3:4] << 8)) >> torch.arange(16, dtype=torch.int32)) & 1
    return scales[..., 0], e8, e16


# ---------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_vectors_last_dim(case, backend):
    c = load_cases("hif4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    y = fake_quant(x, "hif4", backend=backend)
    assert_same_bits(y, torch.from_numpy(c["y_cuda_semantics"]))
    # the toolkit's PyTorch path rounds "t + 0.5" in float32: only the documented trap differs
    assert n_bit_differences(y, torch.from_numpy(c["y"])) == (2 if case == "fp32trap_1x64" else 0)
    # the toolkit's float64 numpy reference agrees, except that it turns an Inf block into NaN
    assert n_bit_differences(y, torch.from_numpy(c["y_numpy_ref"])) == (64 if case == "special_2x64" else 0)
    assert_same_bits(decode(encode(x, "hif4", backend=backend), backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_vectors_dim0(case, backend):
    # y_dim0 comes from the toolkit's PyTorch path (float32 "+ 0.5"); along dim 0 no element hits
    # the fp32 trap, so it equals the CUDA semantics exactly in every case.
    c = load_cases("hif4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    want = torch.from_numpy(c["y_dim0"])
    assert_same_bits(fake_quant(x, "hif4", axis=0, backend=backend), want)
    assert_same_bits(decode(encode(x, "hif4", axis=0, backend=backend), backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_vectors_metadata(case, backend):
    # scale_e6m2: float32 scale value per block (NaN for a NaN block); e1_8: (rows, nblk, 8) bits;
    # e1_16: (rows, nblk, 8, 2), i.e. bit j = 2 * a + b of the 16 groups of 4 at [a, b].
    c = load_cases("hif4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    rows, nblk = c["scale_e6m2"].shape
    code, e8, e16 = unpack_scales(encode(x, "hif4", backend=backend).scales)
    assert_same_bits(scale_value(code), torch.from_numpy(c["scale_e6m2"]))
    assert torch.equal(e8, torch.from_numpy(c["e1_8"]).to(torch.int32))
    assert torch.equal(e16, torch.from_numpy(c["e1_16"]).reshape(rows, nblk, 16).to(torch.int32))
    ref_code, ref_e8, ref_e16 = choose_meta_ref(_padded(x))
    assert torch.equal(ref_code, code)
    assert torch.equal(ref_e8.to(torch.int32), e8) and torch.equal(ref_e16.to(torch.int32), e16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_bf16_input(backend):
    # bf16 input is computed in float32, so it gives the float32 result (exact in bf16) ...
    c = load_cases("hif4_cases.npz")["bf16_4x64"]
    x = torch.from_numpy(c["x"]).bfloat16()
    y = fake_quant(x, "hif4", backend=backend)
    assert_same_bits(y, torch.from_numpy(c["y_cuda_semantics"]).bfloat16())
    # ... not y_bf16io, the toolkit run with bf16 arithmetic (formats.md §6.8: 4 of 256 change)
    assert n_bit_differences(y.float(), torch.from_numpy(c["y_bf16io"])) == 4


# ---------------------------------------------------------------- the algorithm, by hand

def test_constants_and_scale_rounding():
    # S0 = bf16(A * 0.142578125): A = 7 gives 1 - 2^-9, a bf16 tie that rounds (to even) to 1.0
    x = torch.zeros(1, 64)
    x[0, 0] = 7.0
    code, e8, e16 = choose_meta_ref(x)
    assert int(code) == 48 << 2 and scale_value(code).item() == 1.0
    # 1.875 * 2^E is an E6M2 tie between 1.75 and 2: RNE carries into 2^(E+1).
    # A = 13.15 -> A * c = 1.87490... -> bf16 1.875 -> S = 2
    x[0, 0] = 13.15
    assert scale_value(choose_meta_ref(x)[0]).item() == 2.0
    # A = 11.4 -> A * c = 1.62539... -> bf16 1.625, a tie between 1.5 and 1.75: even (1.5) wins
    x[0, 0] = 11.4
    assert (x[0, 0] * 0.142578125).bfloat16().item() == 1.625
    assert scale_value(choose_meta_ref(x)[0]).item() == 1.5


def test_reciprocal_is_bf16_and_micro_exponents_use_it():
    # S = 1.25 -> R = bf16(0.8) = 0.80078125. A group max of 4.996 gives 4.996 * R = 4.0007 >= 4,
    # so E1_8 = 1, although the exact ratio 4.996 / 1.25 = 3.9968 is below 4.
    x = torch.zeros(1, 64)
    x[0, 0] = 8.75   # A * c = 1.2475... -> bf16 1.25 -> S = 1.25
    x[0, 8] = 4.996
    code, e8, e16 = choose_meta_ref(x)
    assert scale_value(code).item() == 1.25
    assert e8[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    # groups of 4: 8.75 * R / 2 = 3.50 >= 2 and 4.996 * R / 2 = 2.0003 >= 2 -> 1; empty groups 0
    assert e16[0, 0, :4].tolist() == [1, 0, 1, 0]
    # element 8: d = 2, t = fp32(4.996 / 4 * R) * 4 = 4.0007 -> k = 4 -> 4/4 * 4 * 1.25 = 5
    assert fake_quant_ref(x, "hif4")[0, 8].item() == 5.0


def test_raw_maxima_decide_micro_exponents():
    # formats.md §2.2 note: ties_2x64 row 0 has S = 1; x[15] = 1.875 is the max of its groups
    # (elements 8..15 and 12..15), 1.875 * R < 2 keeps E1_8 = E1_16 = 0, so it saturates to 1.75
    # (rounded first it would have been 2 = 1 * 2^1).
    c = load_cases("hif4_cases.npz")["ties_2x64"]
    x = torch.from_numpy(c["x"])
    assert x[0, 15].item() == 1.875 and x[0, 8:16].abs().max().item() == 1.875
    for backend in BACKENDS:
        y = fake_quant(x, "hif4", backend=backend)
        assert y[0, 15].item() == 1.75


def test_fp32_trap_is_rounded_exactly():
    # t = 0.5 - 2^-25 rounds to 0 exactly; the float32 "+ 0.5" would give 1 (formats.md §6.2)
    x = torch.zeros(1, 64)
    x[0, 0] = 7.0                                 # S = 1, R = 1, d = 2 for group 0, 0 elsewhere
    x[0, 32] = 0.125 - 2.0 ** -27                 # t = 4 * x = 0.5 - 2^-25
    assert fake_quant_ref(x, "hif4")[0, 32].item() == 0.0
    x[0, 32] = 0.125                              # an exact tie rounds away: 0.25
    assert fake_quant_ref(x, "hif4")[0, 32].item() == 0.25


# ---------------------------------------------------------------- specials

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_poisons_only_its_block(backend):
    x = torch.randn(2, 130)
    x[0, 70] = float("nan")
    y = fake_quant(x, "hif4", backend=backend)
    assert torch.isnan(y[0, 64:128]).all()
    assert not torch.isnan(y[0, :64]).any() and not torch.isnan(y[0, 128:]).any()
    assert not torch.isnan(y[1]).any()
    assert_same_bits(y[0, :64], fake_quant(x[0:1, :64], "hif4", backend=backend)[0])
    p = encode(x, "hif4", backend=backend)
    assert p.scales[0, 1].tolist() == [0xFF, 0, 0, 0]          # canonical NaN block
    assert (p.codes[0, 32:64] == 0).all()
    assert_same_bits(decode(p, backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_inf_saturates_and_zeroes_its_block(backend, sign):
    x = torch.randn(1, 64)
    x[0, 41] = sign * float("inf")
    y = fake_quant(x, "hif4", backend=backend)
    assert y[0, 41].item() == sign * 344064.0
    others = torch.cat([y[0, :41], y[0, 42:]])
    assert (others == 0).all()
    assert torch.equal(torch.signbit(others), torch.signbit(torch.cat([x[0, :41], x[0, 42:]])))
    p = encode(x, "hif4", backend=backend)
    code, e8, e16 = unpack_scales(p.scales)
    assert int(code) == 0xFE and scale_value(code).item() == 49152.0        # S clamped to the max
    assert e8[0, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]                   # group 41 // 8 = 5
    assert e16[0, 0].tolist() == [int(j == 10) for j in range(16)]          # group 41 // 4 = 10
    nib = (int(p.codes[0, 20]) >> 4) & 0xF                                  # element 41: high nibble
    assert nib == ((8 if sign < 0 else 0) | 7)                              # k = 7 with d = 2
    assert_same_bits(decode(p, backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_keep_their_sign(backend):
    x = torch.zeros(2, 64)
    x[0, 1] = -0.0
    x[1, :] = 1.0
    x[1, 5] = -1e-3                                # rounds to 0 under S = 0.15625: keeps its sign
    x[1, 6] = -0.0
    y = fake_quant(x, "hif4", backend=backend)
    assert (y[0] == 0).all() and torch.equal(torch.signbit(y[0]), torch.signbit(x[0]))
    assert y[1, 5].item() == 0 and torch.signbit(y[1, 5]) and torch.signbit(y[1, 6])
    p = encode(x, "hif4", backend=backend)
    assert int(p.scales[0, 0, 0]) == 0                         # all-zero block: S = 2^-48 (code 0)
    assert int(p.codes[0, 0]) == 0x80                          # element 1 (high nibble): sign only
    assert_same_bits(decode(p, backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_and_huge_blocks(backend):
    x = torch.tensor([[1e-30, -3e-30, 2.0 ** -50, 2.0 ** -51, 2.0 ** -52] + [0.0] * 59,
                      [1e6, -5e5, 3e38, 1.0, 0.0] + [0.0] * 59])
    y = fake_quant(x, "hif4", backend=backend)
    # S clamps to 2^-48 and R = 2^48: the smallest step is 2^-50 and 2^-51 is a tie (away from 0)
    assert y[0, :5].tolist() == [0.0, -0.0, 2.0 ** -50, 2.0 ** -50, 0.0]
    assert torch.signbit(y[0, 1])
    # S clamps to 49152 (d = 2 for the first group of 4): everything large saturates to 344064
    assert y[1, :4].tolist() == [344064.0, -344064.0, 344064.0, 0.0]


# ---------------------------------------------------------------- cpp == ref

@st.composite
def _tensors(draw):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 150 if ndim == 1 else 9), min_size=ndim, max_size=ndim))
    if ndim > 1:
        shape[draw(st.integers(0, ndim - 1))] = draw(st.integers(1, 200))   # one long axis
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = (-26, 17) if dtype == torch.float16 else (-70, 70)      # binades the dtype can hold
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape))
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(lo, hi, (n,), generator=g).float())
    special = torch.rand(n, generator=g)
    rate = draw(st.sampled_from([0.0, 0.002, 0.02]))
    x[special < rate] = float("nan")
    x[(special >= rate) & (special < 2 * rate)] = float("inf")
    x[(special >= 2 * rate) & (special < 3 * rate)] = -float("inf")
    x[(special >= 3 * rate) & (special < 0.05 + 3 * rate)] = -0.0
    x[(special >= 0.05 + 3 * rate) & (special < 0.1 + 3 * rate)] = 0.0
    axis = draw(st.integers(-ndim, ndim - 1))
    return x.reshape(shape).to(dtype), axis


@settings(max_examples=60, deadline=None)
@given(_tensors())
def test_cpp_matches_ref(xa):
    x, axis = xa
    y_ref = fake_quant(x, "hif4", axis, backend="ref")
    y_cpp = fake_quant(x, "hif4", axis, backend="cpp")
    assert y_cpp.dtype == x.dtype
    assert_same_bits(y_cpp, y_ref)
    p_ref = encode(x, "hif4", axis, backend="ref")
    p_cpp = encode(x, "hif4", axis, backend="cpp")
    assert torch.equal(p_cpp.codes, p_ref.codes) and torch.equal(p_cpp.scales, p_ref.scales)
    assert p_cpp.tensor_scale is None and p_ref.tensor_scale is None
    want = fake_quant(x.float(), "hif4", axis, backend="ref")
    for backend in BACKENDS:
        assert_same_bits(decode(p_ref, backend=backend), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_compute_in_float32(dtype):
    # fake_quant(x) == fake_quant(x.float()) rounded to x's dtype (fp16: 344064 overflows to Inf)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 300, generator=g) * torch.exp2(torch.randint(-30, 30, (5, 300), generator=g).float()))
    x[2, 7] = float("inf")
    x = x.to(dtype)
    want = fake_quant_ref(_padded(x.float()), "hif4")[:, :300].to(dtype)
    for backend in BACKENDS:
        assert_same_bits(fake_quant(x, "hif4", backend=backend), want)


# ---------------------------------------------------------------- metadata helpers

def test_fake_quant_with_standard_meta_is_fake_quant():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 192, generator=g) * torch.exp2(torch.randint(-20, 20, (6, 192), generator=g).float())
    x[1, 3], x[4, 100] = float("nan"), -float("inf")
    meta = choose_meta_ref(x)
    assert meta[0].shape == (6, 3) and meta[1].shape == (6, 3, 8) and meta[2].shape == (6, 3, 16)
    assert_same_bits(fake_quant_with_meta_ref(x, *meta), fake_quant_ref(x, "hif4"))
    assert_same_bits(fake_quant_with_meta_ref(x, *meta), fake_quant(x, "hif4", backend="cpp"))


def test_fake_quant_with_external_meta():
    x = torch.zeros(1, 64)
    x[0, :8] = torch.tensor([0.3, -0.7, 1.1, 3.0, 5.0, 0.26, -13.9, 2.2])
    code = torch.tensor([[48 << 2]], dtype=torch.uint8)               # S = 1, R = 1
    e8 = torch.zeros(1, 1, 8, dtype=torch.uint8)
    e16 = torch.zeros(1, 1, 16, dtype=torch.uint8)
    e16[0, 0, 1] = 1                                                 # elements 4..7: d = 1
    y = fake_quant_with_meta_ref(x, code, e8, e16)
    # d = 0: step 0.25, max 1.75; d = 1: step 0.5, max 3.5 (half away, saturating)
    assert y[0, :8].tolist() == [0.25, -0.75, 1.0, 1.75, 3.5, 0.5, -3.5, 2.0]
    with pytest.raises(ValueError, match="e1_16"):
        fake_quant_with_meta_ref(x, code, e8, e16[..., :8])
    with pytest.raises(ValueError, match="bits"):
        fake_quant_with_meta_ref(x, code, e8 + 2, e16)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_of_a_hand_built_block(backend):
    # S = 1 (x max 7 -> S0 = bf16(0.998) -> 1.0): code (0 + 48) << 2 = 0xC0; R = 1
    x = torch.zeros(1, 64)
    x[0, 0] = 7.0            # group8 0 (E1_8=1: 7 >= 4), group4 0 (7 / 2 >= 2 -> E1_16=1): d=2, k=7
    x[0, 1] = -1.0           # d = 2: t = 1, k = 1, sign
    x[0, 9] = 2.5            # group8 1 (2.5 < 4), group4 2 (2.5 >= 2 -> 1): d = 1, t = 5, k = 5
    x[0, 62] = -0.375        # group8 7, group4 15: d = 0, t = 1.5 -> k = 2 (half away), sign
    p = encode(x, "hif4", backend=backend)
    assert p.codes.shape == (1, 32) and p.scales.shape == (1, 1, 4) and p.tensor_scale is None
    want_codes = [0] * 32
    want_codes[0] = 0x7 | (0x9 << 4)          # element 0 low nibble, element 1 high nibble
    want_codes[4] = 0x5 << 4                  # element 9: high nibble of byte 4
    want_codes[31] = 0x8 | 0x2                # element 62: low nibble of byte 31
    assert p.codes[0].tolist() == want_codes
    assert p.scales[0, 0].tolist() == [0xC0, 0b00000001, 0b00000101, 0x00]
    assert decode(p, backend=backend)[0, [0, 1, 9, 62]].tolist() == [7.0, -1.0, 2.5, -0.5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_every_scale_code_and_nibble(backend):
    # 256 blocks, one per E6M2 code; block b holds all 16 nibbles four times with varying E1 bits
    codes = torch.arange(16, dtype=torch.uint8).repeat(4)
    codes = (codes[0::2] | (codes[1::2] << 4)).repeat(256, 1).reshape(1, 256 * 32)
    scales = torch.zeros(1, 256, 4, dtype=torch.uint8)
    scales[0, :, 0] = torch.arange(256, dtype=torch.uint8)
    scales[0, :, 1] = torch.arange(256, dtype=torch.uint8)
    scales[0, :, 2] = torch.arange(256, dtype=torch.uint8).flip(0)
    scales[0, :, 3] = 0x5A
    p = Packed("hif4", (256 * 64,), 0, codes, scales, None)
    y = decode(p, backend=backend).reshape(256, 64)
    b = torch.arange(256)
    S = torch.where(b == 255, float("nan"), torch.ldexp(1 + (b & 3) / 4, (b >> 2) - 48).float())
    i = torch.arange(64)
    e8 = (b[:, None] >> (i // 8)) & 1
    e16 = (((255 - b[:, None]) | (0x5A << 8)) >> (i // 4)) & 1
    nib = i % 16
    want = torch.where(nib >= 8, -1.0, 1.0) * (nib & 7) / 4 * torch.exp2((e8 + e16).float()) * S[:, None]
    assert_same_bits(y, want.float())


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rejects_bad_packed(backend):
    p = encode(torch.randn(2, 64), "hif4", backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="scales"):
        decode(Packed("hif4", (2, 64), 1, p.codes, None, None), backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="scales"):
        decode(Packed("hif4", (2, 64), 1, p.codes, p.scales[:, :, :3], None), backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="codes"):
        decode(Packed("hif4", (2, 128), 1, p.codes, p.scales, None), backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="tensor scale"):
        decode(Packed("hif4", (2, 64), 1, p.codes, p.scales, torch.tensor(1.0)), backend=backend)
    with pytest.raises((TypeError, RuntimeError), match="uint8"):
        decode(Packed("hif4", (2, 64), 1, p.codes.to(torch.int32), p.scales, None), backend=backend)


def test_reference_rejects_unpadded_and_wrong_format():
    with pytest.raises(ValueError, match="multiple of the HiF4 block"):
        fake_quant_ref(torch.zeros(2, 100), "hif4")
    with pytest.raises(ValueError, match="only 'hif4'"):
        fake_quant_ref(torch.zeros(2, 64), "hif8")


def test_kernel_rejects_bad_arguments():
    from lpq.formats._build import load_kernel

    ext = load_kernel("hif4")
    x = torch.zeros(2, 64)
    with pytest.raises(RuntimeError, match="only 'hif4'"):
        ext.fake_quant(x, "mxfp4", torch.empty_like(x))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.fake_quant(x.double(), "hif4", torch.empty_like(x.double()))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.encode(torch.zeros(64, 2).t(), "hif4")
    with pytest.raises(RuntimeError, match="out must be"):
        ext.fake_quant(x, "hif4", torch.empty(2, 65))
