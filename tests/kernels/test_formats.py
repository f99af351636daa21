"""Triton fake-quant kernels == the plain-PyTorch references, bit for bit: golden vectors (all
cases, NaN / Inf / signed zeros included), hypothesis cases in every format, dtype and scale, the
fused statistics, and the dispatch of lpq.formats.api. Small inputs: under the interpreter each
kernel launch costs milliseconds per program."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpq.formats import FORMATS, fake_quant, mx
from lpq.formats.api import fake_quant_scaled, fake_quant_stats, moments
from tests.formats.vectors import assert_same_bits, load_cases, vector_path

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = ["normal_4x64", "normal_3x128", "heavy_4x64", "heavy_3x128", "bf16_4x64", "ties_2x64",
         "fp32trap_1x64", "log2trap_2x64", "edge_5x100", "special_2x64"]
NAN, INF = float("nan"), float("inf")

# the interpreter evaluates with numpy, which warns on the Inf/NaN arithmetic the kernels mask out
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def triton_fq(x: torch.Tensor, fmt: str, axis: int = -1, scale: float | None = None) -> torch.Tensor:
    xd = x.to(DEVICE)
    y = fake_quant(xd, fmt, axis, backend="triton") if scale is None else \
        fake_quant_scaled(xd, fmt, scale, axis, backend="triton")
    assert y.dtype == x.dtype and y.shape == x.shape
    return y.cpu()


def ref_fq(x: torch.Tensor, fmt: str, axis: int = -1, scale: float | None = None) -> torch.Tensor:
    return fake_quant(x, fmt, axis, backend="ref") if scale is None else \
        fake_quant_scaled(x, fmt, scale, axis, backend="ref")


# ---------------------------------------------------------------- golden vectors

def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(vector_path(name)) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("name,dtype", [("hif8_fp16_all.npz", torch.float16), ("hif8_bf16_all.npz", torch.bfloat16)])
def test_hif8_all_16bit_inputs(name, dtype):
    d = _npz(name)
    x, want = torch.from_numpy(d["input"]), torch.from_numpy(d["output"])
    assert_same_bits(triton_fq(x, "hif8"), want)
    # every HiF8 value is exact in these dtypes, so the 16-bit paths give the same numbers
    assert_same_bits(triton_fq(x.to(dtype), "hif8"), want.to(dtype))


def test_hif8_fp32_edges_both_axes():
    d = _npz("hif8_fp32_edges.npz")
    x, want = torch.from_numpy(d["input"]).reshape(10, -1), torch.from_numpy(d["output"]).reshape(10, -1)
    assert_same_bits(triton_fq(x, "hif8"), want)
    assert_same_bits(triton_fq(x, "hif8", axis=0), want)


@pytest.mark.parametrize("case", CASES)
def test_hif4_vectors(case):
    c = load_cases("hif4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    assert_same_bits(triton_fq(x, "hif4"), torch.from_numpy(c["y_cuda_semantics"]))
    assert_same_bits(triton_fq(x, "hif4", axis=0), torch.from_numpy(c["y_dim0"]))
    assert_same_bits(triton_fq(x.bfloat16(), "hif4"), ref_fq(x.bfloat16(), "hif4"))


@pytest.mark.parametrize("case", CASES)
def test_mx_vectors(case):
    c = load_cases("mxfp4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    for fmt, keys in (("mxfp4", ("y", "y_dim0")), ("mxfp4-toolkit", ("y_toolkit", "y_toolkit_dim0"))):
        for axis, key in zip((-1, 0), keys):
            assert_same_bits(triton_fq(x, fmt, axis), torch.from_numpy(c[key]))
    # mxfp4-rceil: torchao's vectors where the spec follows them (not the special case), the
    # reference everywhere; nvfp4 has no vectors: the reference
    if case != "special_2x64":
        assert_same_bits(triton_fq(x, "mxfp4-rceil"), torch.from_numpy(c["y_torchao_rceil"]))
    for fmt in ("mxfp4-rceil", "nvfp4"):
        for axis in (-1, 0):
            assert_same_bits(triton_fq(x, fmt, axis), ref_fq(x, fmt, axis))


def test_toolkit_scale_near_powers_of_two():
    # formats.md 3.5's log2 trap: block maxima v - eps on both sides of each exponent's threshold
    # (where the float32 log2 of v = amax + eps rounds up to the next power of two), a few ulps
    # below the power and at it, for every exponent field a block maximum can have
    from lpq.kernels.formats import _toolkit_thresholds

    thr = _toolkit_thresholds("cpu").long()
    fields = torch.arange(127 - 25, 255)
    offs = torch.stack([thr[fields] - 1, thr[fields], torch.full_like(fields, mx.NEAR_POW2_MANT - 1),
                        torch.full_like(fields, (1 << 23) - 1), torch.full_like(fields, 1 << 23)], dim=1)
    v = ((fields[:, None] << 23) + offs).clamp(max=0x7F7FFFFF).to(torch.int32).view(torch.float32)
    amax = (v - torch.tensor(mx.TOOLKIT_EPS, dtype=torch.float32)).reshape(-1, 1)
    x = torch.cat([amax, amax * 0.3, -amax * 0.07], dim=1)
    assert_same_bits(triton_fq(x, "mxfp4-toolkit"), ref_fq(x, "mxfp4-toolkit"))


# ---------------------------------------------------------------- hypothesis

SPECIALS = [0.0, -0.0, NAN, INF, -INF, 1e-45, -1e-45, 2.0 ** -126, 6.0, 5.0, 0.25, 40960.0, 32768.0, 344064.0,
            3.0e38, -3.4e38, 1.5 * 2.0 ** -127, 2.0 ** 127]


@st.composite
def _tensors(draw):
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 140))
    scale_exp = draw(st.integers(-60, 60))
    base = st.floats(-2.0 ** 20, 2.0 ** 20, width=32, allow_nan=False, allow_infinity=False)
    vals = draw(st.lists(st.one_of(base, st.sampled_from(SPECIALS)), min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(vals, dtype=torch.float32).reshape(rows, cols) * 2.0 ** scale_exp
    return x


@settings(max_examples=40, deadline=None)
@given(x=_tensors(), fmt=st.sampled_from(sorted(FORMATS)), dtype=st.sampled_from(DTYPES),
       axis=st.sampled_from([-1, 0]))
def test_fake_quant_matches_reference(x, fmt, dtype, axis):
    x = x.to(dtype)
    assert_same_bits(triton_fq(x, fmt, axis), ref_fq(x, fmt, axis))


@settings(max_examples=40, deadline=None)
@given(x=_tensors(), fmt=st.sampled_from(sorted(FORMATS)), dtype=st.sampled_from(DTYPES),
       scale=st.one_of(st.integers(-30, 30).map(lambda e: 2.0 ** e),
                       st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)))
def test_fake_quant_scaled_matches_reference(x, fmt, dtype, scale):
    # power-of-two scales (QAT's) and arbitrary float32 ones: the kernel multiplies, quantizes and
    # divides (correctly rounded) exactly as the expression in fake_quant_scaled's docstring
    x = x.to(dtype)
    assert_same_bits(triton_fq(x, fmt, scale=scale), ref_fq(x, fmt, scale=scale))


def test_scalar_empty_and_noncontiguous():
    for fmt in FORMATS:
        assert_same_bits(triton_fq(torch.tensor(3.3), fmt), ref_fq(torch.tensor(3.3), fmt))
        assert triton_fq(torch.empty(0, 5), fmt).shape == (0, 5)
        x = torch.randn(3, 40, 6, generator=torch.Generator().manual_seed(0)).transpose(0, 2)
        assert_same_bits(triton_fq(x, fmt, axis=1), ref_fq(x, fmt, axis=1))


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("scale", [None, 2.0 ** 12])
def test_fused_statistics_match_reference(fmt, scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g) * 30
    x[0, :4] = torch.tensor([1e-30, -1e-30, 0.0, 9.0])      # flushed, a zero, ...
    x[1, 7] = 20.0                                           # overflows HiF8 once scaled by 2^12
    y, got = fake_quant_stats(x.to(DEVICE), fmt, scale, counts=True, backend="triton")
    y_ref, want = fake_quant_stats(x, fmt, scale, counts=True, backend="ref")
    assert_same_bits(y.cpu(), y_ref)
    assert got.keys() == want.keys() == ({"amax", "sumsq", "overflow", "flushed"} | ({"coarse"} if fmt == "hif8" else set()))
    assert_same_bits(got["amax"].cpu(), want["amax"])
    assert torch.allclose(got["sumsq"].cpu(), want["sumsq"], rtol=1e-12, atol=0)
    for key in ("overflow", "flushed", "coarse"):
        if key in want:
            assert int(got[key]) == int(want[key]), key
    if fmt == "hif8" and scale is not None:
        assert int(want["overflow"]) > 0 and int(want["coarse"]) > 0 and int(want["flushed"]) > 0


def test_moments_nan_and_bfloat16():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)).bfloat16()
    amax, sumsq = moments(x.to(DEVICE), backend="triton")
    ra, rs = moments(x, backend="ref")
    assert_same_bits(amax.cpu(), ra) and torch.allclose(sumsq.cpu(), rs, rtol=1e-12)
    x[500] = NAN
    assert torch.isnan(moments(x.to(DEVICE), backend="triton")[0])


# ---------------------------------------------------------------- dispatch

def test_triton_backend_refusals():
    with pytest.raises(TypeError, match="Triton kernels take"):
        fake_quant(torch.ones(4, dtype=torch.float64, device=DEVICE), "hif8", backend="triton")
    with pytest.raises(ValueError, match="valid: auto, cpp, ref, triton"):
        fake_quant(torch.ones(4), "hif8", backend="cuda")


def test_toolkit_threshold_table_reproduces_the_reference_log2():
    from lpq.kernels.formats import _toolkit_thresholds

    thr = _toolkit_thresholds("cpu")
    fields = torch.arange(1, 255, dtype=torch.int32)
    mants = torch.arange(mx.NEAR_POW2_MANT - 3, 1 << 23, dtype=torch.int32)
    bits = (fields[:, None] << 23) | mants[None, :]
    v = bits.reshape(-1).view(torch.float32)
    want = mx.toolkit_floor_log2(v.contiguous())
    got = (bits >> 23) - 127 + (mants[None, :] >= thr[fields.long()][:, None]).int()
    assert torch.equal(got.reshape(-1), want)
    assert (thr[fields.long()] < (1 << 23)).any()     # the log2 does round up somewhere


@pytest.mark.gpu
def test_cuda_tensors_take_the_triton_kernels(monkeypatch):
    from lpq.kernels import formats

    calls = []
    orig = formats.fake_quant_rows
    monkeypatch.setattr(formats, "fake_quant_rows", lambda *a, **k: calls.append(a[1]) or orig(*a, **k))
    x = torch.randn(64, 256, device="cuda")
    for fmt in FORMATS:
        assert_same_bits(fake_quant(x, fmt).cpu(), fake_quant(x.cpu(), fmt, backend="ref"))
    assert calls == list(FORMATS)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_large_cuda_tensor_matches_reference(fmt):
    # many programs, every exponent range, bf16 input: the compiled kernel (not the interpreter)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 1000, device="cuda", generator=g) * torch.exp2(
        torch.randint(-40, 40, (4096, 1), device="cuda", generator=g).float())
    for t in (x, x.bfloat16()):
        assert_same_bits(fake_quant(t, fmt).cpu(), fake_quant(t, fmt, backend="ref").cpu())
        assert_same_bits(fake_quant_scaled(t, fmt, 2.0 ** -7).cpu(), fake_quant_scaled(t, fmt, 2.0 ** -7, backend="ref").cpu())
