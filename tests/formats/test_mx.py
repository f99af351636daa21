"""MXFP4 family (mxfp4, mxfp4-rceil, mxfp4-toolkit, nvfp4): golden vectors, independent oracles,
specials, cpp == ref, packing, scale-search helpers, bad input."""
from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpq.formats import Packed, decode, encode, fake_quant
from lpq.formats import mx
from tests.formats.vectors import assert_same_bits, load_cases

BACKENDS = ["ref", "cpp"]
FORMATS = ["mxfp4", "mxfp4-rceil", "mxfp4-toolkit", "nvfp4"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = ["normal_4x64", "normal_3x128", "heavy_4x64", "heavy_3x128", "bf16_4x64", "ties_2x64",
         "fp32trap_1x64", "log2trap_2x64", "edge_5x100", "special_2x64"]
NAN, INF = float("nan"), float("inf")


def assert_same_packed(a: Packed, b: Packed) -> None:
    assert a.fmt == b.fmt and a.shape == b.shape and a.axis == b.axis
    assert torch.equal(a.codes, b.codes), "codes differ"
    assert torch.equal(a.scales, b.scales), "scales differ"
    if a.tensor_scale is None or b.tensor_scale is None:
        assert a.tensor_scale is None and b.tensor_scale is None
    else:
        assert_same_bits(a.tensor_scale, b.tensor_scale)


def _pad(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    L = x.shape[1]
    return torch.nn.functional.pad(x, (0, -(-L // block) * block - L))


def _block_nonfinite(x: np.ndarray, block: int = 32) -> np.ndarray:
    """(rows, nblk) mask of blocks holding a NaN or an Inf (the last dim zero-padded)."""
    xp = _pad(torch.from_numpy(x), block).numpy()
    return ~np.isfinite(xp.reshape(xp.shape[0], -1, block)).all(axis=2)


# ---------------------------------------------------------------- golden vectors

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt,keys", [("mxfp4", ("y", "y_dim0")), ("mxfp4-toolkit", ("y_toolkit", "y_toolkit_dim0"))])
def test_vectors_fake_quant_and_round_trip(fmt, keys, case, backend):
    c = load_cases("mxfp4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    for axis, key in zip((-1, 0), keys):
        want = torch.from_numpy(c[key])
        assert_same_bits(fake_quant(x, fmt, axis, backend=backend), want)
        assert_same_bits(decode(encode(x, fmt, axis, backend=backend), backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_vectors_scale_exp(case, backend):
    # the vectors record -127 for the non-finite blocks of special_2x64; the spec stores 0xFF there
    c = load_cases("mxfp4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    nonfinite = torch.from_numpy(_block_nonfinite(c["x"]))
    want = torch.where(nonfinite, 0xFF, torch.from_numpy(c["scale_exp"]) + 127)
    assert torch.equal(encode(x, "mxfp4", backend=backend).scales.to(torch.int64), want.to(torch.int64))
    exps = mx.shared_exponent_ref(_pad(x), "mxfp4")
    assert exps.dtype == torch.int32
    assert torch.equal(exps.to(torch.int64), want.to(torch.int64) - 127)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c != "special_2x64"])
def test_vectors_rceil(case, backend):
    c = load_cases("mxfp4_cases.npz")[case]
    x = torch.from_numpy(c["x"])
    want = torch.from_numpy(c["y_torchao_rceil"])
    assert_same_bits(fake_quant(x, "mxfp4-rceil", backend=backend), want)
    assert_same_bits(decode(encode(x, "mxfp4-rceil", backend=backend), backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_rceil_special_follows_the_spec(backend):
    # torchao gives Inf-and-zeros for the Inf block; the spec makes every non-finite block NaN and
    # leaves the finite blocks as torchao has them
    c = load_cases("mxfp4_cases.npz")["special_2x64"]
    x = torch.from_numpy(c["x"])
    y = fake_quant(x, "mxfp4-rceil", backend=backend)
    bad = torch.from_numpy(_block_nonfinite(c["x"])).repeat_interleave(32, dim=1)
    assert bad.sum() == 64
    assert torch.isnan(y[bad]).all()
    assert_same_bits(y[~bad], torch.from_numpy(c["y_torchao_rceil"])[~bad])
    assert (encode(x, "mxfp4-rceil", backend=backend).scales[bad[:, ::32]] == 0xFF).all()


# ---------------------------------------------------------------- independent oracles

def _wide_random(seed: int, rows: int, cols: int) -> np.ndarray:
    """float32 values over many binades (subnormals included), one base binade per row."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-150, 124, size=(rows, 1))
    e = base + rng.integers(-10, 3, size=(rows, cols))
    x = rng.uniform(1, 2, size=(rows, cols)) * np.exp2(e.astype(np.float64)) * rng.choice([-1, 1], (rows, cols))
    x = x.astype(np.float32)
    x[rng.random((rows, cols)) < 0.05] = 0.0
    x[rng.random((rows, cols)) < 0.03] = -0.0
    return x


def _e2m1(q: np.ndarray) -> np.ndarray:
    """E2M1 round to nearest even, saturating at 6 (ml_dtypes), as float64."""
    return np.clip(q, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)


def _ocp_oracle(x: np.ndarray, exps: np.ndarray) -> np.ndarray:
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float64)
    scale = np.exp2(exps.astype(np.float64))[..., None]
    y = np.copysign(_e2m1(xb / scale) * scale, xb).astype(np.float32)
    return y.reshape(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_ocp_against_frexp_and_ml_dtypes(backend, seed):
    x = _wide_random(seed, 64, 96)
    amax = np.abs(x.reshape(64, -1, 32)).max(axis=2)
    _, e = np.frexp(amax)                     # amax = m 2^e, m in [0.5, 1): floor(log2) = e - 1
    exps = np.maximum(e - 1 - 2, -127)
    want = torch.from_numpy(_ocp_oracle(x, exps))
    assert_same_bits(fake_quant(torch.from_numpy(x), "mxfp4", backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_rceil_against_frexp_and_ml_dtypes(backend, seed):
    x = _wide_random(100 + seed, 64, 96)
    amax = np.abs(x.reshape(64, -1, 32)).max(axis=2)
    d = amax * (np.float32(1) / np.float32(6))          # fp32(amax * fp32(1/6))
    assert d.dtype == np.float32
    m, e = np.frexp(d)                        # ceil(log2 d) = e - 1 when m == 0.5, else e
    exps = np.clip(np.where(m == 0.5, e - 1, e), -127, 127)
    want = torch.from_numpy(_ocp_oracle(x, exps))
    assert_same_bits(fake_quant(torch.from_numpy(x), "mxfp4-rceil", backend=backend), want)


def test_rceil_exponent_same_with_division_by_6():
    # torchao computes d = amax / 6, the spec d = amax * fp32(1/6): same ceil(log2 d) everywhere,
    # checked on every float within 2000 ulps of 6 * 2^k (where a difference could show)
    ks = np.arange(-150, 126)
    centre = (6 * np.exp2(ks.astype(np.float64))).astype(np.float32).view(np.int32).astype(np.int64)
    bits = (centre[:, None] + np.arange(-2000, 2000)[None, :]).ravel()
    amax = bits[(bits > 0) & (bits < 0x7F800000)].astype(np.int32).view(np.float32)
    d = amax / np.float32(6)
    m, e = np.frexp(d)
    want = np.clip(np.where(m == 0.5, e - 1, e), -127, 127)
    want[d == 0] = -127
    x = torch.zeros(len(amax), 32)
    x[:, 0] = torch.from_numpy(amax)
    assert torch.equal(mx.shared_exponent_ref(x, "mxfp4-rceil")[:, 0], torch.from_numpy(want).to(torch.int32))


def _nv_oracle(x: np.ndarray) -> np.ndarray:
    """nvfp4 per the mx.py docstring, with numpy float32 and ml_dtypes casts (finite x)."""
    rows, L = x.shape
    s = np.float32(np.abs(x).max()) / np.float32(2688)
    if s == 0:
        s = np.float32(1)
    xb = x.reshape(rows, -1, 16)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    v = np.minimum((amax / np.float32(6)) / s, np.float32(448))
    b = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    bs = b * s
    with np.errstate(divide="ignore", invalid="ignore"):
        e = _e2m1(np.abs(xb) / bs).astype(np.float32)
    y = np.where(bs == 0, np.float32(0), (e * b) * s)
    return np.copysign(y, xb).astype(np.float32).reshape(rows, L)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_nvfp4_against_ml_dtypes(backend, seed):
    rng = np.random.default_rng(seed)
    x = _wide_random(200 + seed, 16, 64)
    if seed % 3 == 1:   # a dominant outlier: far blocks get b = 0 or subnormal e4m3 scales
        x[3, 5] = np.float32(1e30)
    if seed % 3 == 2:   # a tiny tensor: s is subnormal
        x = (rng.standard_normal((16, 64)) * 1e-36).astype(np.float32)
    want = torch.from_numpy(_nv_oracle(x))
    y = fake_quant(torch.from_numpy(x), "nvfp4", backend=backend)
    assert_same_bits(y, want)
    p = encode(torch.from_numpy(x), "nvfp4", backend=backend)
    s = np.float32(np.abs(x).max()) / np.float32(2688)
    assert p.tensor_scale.dtype == torch.float32 and p.tensor_scale.dim() == 0
    assert p.tensor_scale.item() == (s if s != 0 else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvfp4_block_scale_is_torch_e4m3_cast(backend):
    # s = 1 (tensor max 2688), one 16-block per row with max a: b = e4m3fn(fp32(a / 6)); a runs
    # over every float within 100 ulps of 6 * (each e4m3fn value and each midpoint between two)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    centres = torch.cat([grid, (grid[1:] + grid[:-1]) / 2]) * 6
    bits = (centres.view(torch.int32)[:, None] + torch.arange(-100, 101)[None, :]).flatten()
    amax = bits[bits > 0].view(torch.float32)
    amax = amax[amax <= 2688]
    x = torch.zeros(len(amax) + 1, 16)
    x[0, 0] = 2688.0
    x[1:, 0] = amax
    x[1:, 1] = -amax / 7
    p = encode(x, "nvfp4", backend=backend)
    assert p.tensor_scale.item() == 1.0
    v = ((amax / 6) / 1.0).clamp(max=448)
    want = v.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(p.scales[1:, 0], want)
    assert_same_bits(fake_quant(x, "nvfp4", backend=backend), torch.from_numpy(_nv_oracle(x.numpy())))


def test_toolkit_log2_equals_torch_float32_log2():
    # Every v = fp32(amax + eps) whose correctly rounded float32 log2 may round up to the next
    # integer lies within 256 ulps below a power of two; there toolkit_floor_log2 uses float64.
    # (1) it equals the toolkit's own floor(torch.log2(v)) in float32 on all of them, and on a
    # wider window where the exponent field alone must already be right;
    fields = np.arange(127 - 21, 255, dtype=np.int64)
    mant = np.arange(0x7FF000, 0x800000, dtype=np.int64)
    bits = ((fields[:, None] << 23) | mant[None, :]).ravel().astype(np.int32)
    v = torch.from_numpy(bits.view(np.float32).copy())
    ours = mx.toolkit_floor_log2(v)
    assert torch.equal(ours, torch.floor(torch.log2(v)).to(torch.int32))
    field_only = torch.from_numpy((bits >> 23) - 127)
    assert torch.equal(ours[torch.from_numpy((bits & 0x7FFFFF) < mx.NEAR_POW2_MANT)],
                       field_only[torch.from_numpy((bits & 0x7FFFFF) < mx.NEAR_POW2_MANT)])
    assert (ours != field_only).sum() > 3000       # the round-ups do happen
    # (2) the float64 log2 is never near the float32 rounding boundary below the next integer k,
    # so any faithfully rounded float64 log2 (the C++ kernel's std::log2) gives the same answer.
    near = (bits & 0x7FFFFF) >= mx.NEAR_POW2_MANT
    lg = np.log2(bits[near].view(np.float32).astype(np.float64))
    k = ((bits[near] >> 23) - 126).astype(np.float32)
    boundary = (k.astype(np.float64) + np.nextafter(k, np.float32(-np.inf)).astype(np.float64)) / 2
    assert (np.abs(lg - boundary) / np.maximum(np.abs(lg), 1) > 1e5 * 2.0 ** -52).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_toolkit_scale_equals_the_toolkit_formula_near_powers_of_two(backend):
    # amax = every float within 300 ulps below / 4 above each power of two: the scale byte must
    # be the toolkit's clip(floor(torch.log2(amax + 9.6e-7)) - 2, -129, 125) + 127
    fields = np.arange(127 - 25, 255, dtype=np.int64)
    offs = np.arange(-300, 5, dtype=np.int64)
    bits = ((fields[:, None] << 23) + offs[None, :]).ravel()
    bits = bits[bits < 0x7F800000].astype(np.int32)
    amax = torch.from_numpy(bits.view(np.float32).copy()).reshape(-1, 1)
    literal = torch.floor(torch.log2(amax + 9.6e-7)) - 2
    want = literal.clamp(-129, 125).to(torch.int64) + 127
    got = encode(amax, "mxfp4-toolkit", backend=backend).scales.to(torch.int64)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- rounding, by hand

# x with scale 2^0 (block max 6): value -> (OCP round to nearest even, toolkit half away)
_ROUNDING = [
    (0.25, 0.0, 0.5), (0.25 - 2.0 ** -26, 0.0, 0.5), (0.25 - 2.0 ** -25, 0.0, 0.0),
    (0.25 + 2.0 ** -25, 0.5, 0.5), (0.75, 1.0, 1.0), (1.25, 1.0, 1.5), (1.75, 2.0, 2.0),
    (2.5, 2.0, 3.0), (3.5, 4.0, 4.0), (5.0, 4.0, 6.0), (5.0 - 2.0 ** -21, 4.0, 4.0),
    (6.0, 6.0, 6.0), (0.5, 0.5, 0.5), (2.9, 3.0, 3.0), (1e-30, 0.0, 0.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_rounding_by_hand(backend):
    vals = torch.tensor([v for v, _, _ in _ROUNDING], dtype=torch.float32)
    x = torch.zeros(2, 32)
    x[:, 0] = 6.0
    x[0, 1:1 + len(vals)] = vals
    x[1, 1:1 + len(vals)] = -vals
    for fmt, col in [("mxfp4", 1), ("mxfp4-rceil", 1), ("mxfp4-toolkit", 2)]:
        want = torch.tensor([r[col] for r in _ROUNDING], dtype=torch.float32)
        y = fake_quant(x, fmt, backend=backend)
        assert torch.equal(y[0, 1:1 + len(vals)], want), fmt
        assert_same_bits(y[1, 1:1 + len(vals)], -want)          # negative x rounding to 0 -> -0


@pytest.mark.parametrize("backend", BACKENDS)
def test_floor_scale_saturates(backend):
    # amax in [7, 8) * 2^X rounds to 8 and clamps to 6 under the floor rule (pitfall 12); RCEIL
    # picks the next exponent instead
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 7.5, 1.0
    assert fake_quant(x, "mxfp4", backend=backend)[0, :2].tolist() == [6.0, 1.0]
    assert fake_quant(x, "mxfp4-rceil", backend=backend)[0, :2].tolist() == [8.0, 1.0]
    assert encode(x, "mxfp4-rceil", backend=backend).scales.tolist() == [[128]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4-rceil", "mxfp4-toolkit"])
def test_decision_points_dense(backend, fmt):
    # every float within 64 ulps of every rounding decision point, scale 2^0: the cpp kernel
    # compares with the points; the reference computes (exactly, or the toolkit's float32 formula)
    pts = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0]
    bits = np.concatenate([np.float32(p).view(np.int32) + np.arange(-64, 65) for p in pts])
    vals = bits.astype(np.int32).view(np.float32)
    n = -(-len(vals) // 31) * 31
    body = np.zeros(n, np.float32)
    body[:len(vals)] = vals
    x = np.concatenate([np.full((n // 31, 1), 6.0, np.float32), body.reshape(-1, 31)], axis=1)
    x = torch.from_numpy(x)
    y = fake_quant(x, fmt, backend=backend)
    ref = mx.fake_quant_ref(x, fmt)
    assert_same_bits(y, ref)
    if fmt == "mxfp4":   # scale 2^0 in every row: the elements are ml_dtypes' RNE of x
        want = torch.from_numpy(_e2m1(x.numpy().astype(np.float64)).astype(np.float32))
        assert_same_bits(y, want)


# ---------------------------------------------------------------- specials

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4-rceil"])
@pytest.mark.parametrize("special", [NAN, INF, -INF])
def test_ocp_nonfinite_block_is_nan(backend, fmt, special):
    x = torch.randn(2, 70)
    x[0, 40] = special
    y = fake_quant(x, fmt, backend=backend)
    assert torch.isnan(y[0, 32:64]).all()
    assert not torch.isnan(y[0, :32]).any() and not torch.isnan(y[0, 64:]).any()
    assert not torch.isnan(y[1]).any()
    p = encode(x, fmt, backend=backend)
    assert p.scales[0, 1].item() == 0xFF and (p.codes[0, 16:32] == 0).all()
    assert_same_bits(decode(p, backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4-rceil", "nvfp4"])
def test_signed_zeros_kept(backend, fmt):
    x = torch.tensor([[-0.0, 0.0, -1e-30, 1e-30, 4.0, -4.0] + [0.0] * 26])
    y = fake_quant(x, fmt, backend=backend)
    assert torch.signbit(y[0, :4]).tolist() == [True, False, True, False]
    assert (y[0, :4] == 0).all()
    p = encode(x, fmt, backend=backend)
    assert p.codes[0, 0].item() == 0x08 and p.codes[0, 1].item() == 0x08    # low nibble first


@pytest.mark.parametrize("backend", BACKENDS)
def test_toolkit_signs_follow_torch_sign(backend):
    # out = torch.sign(x) * 2^X * element: sign(-0) = +0, so -0 comes back +0; a negative value
    # that rounds to zero gives -0
    x = torch.tensor([[-0.0, 0.0, -1e-30, 1e-30, 4.0, -4.0] + [0.0] * 26])
    y = fake_quant(x, "mxfp4-toolkit", backend=backend)
    assert torch.signbit(y[0, :4]).tolist() == [False, False, True, False]
    p = encode(x, "mxfp4-toolkit", backend=backend)
    assert p.codes[0, 0].item() == 0x00 and p.codes[0, 1].item() == 0x08


@pytest.mark.parametrize("backend", BACKENDS)
def test_toolkit_specials(backend):
    x = torch.randn(3, 64)
    x[0, 5] = NAN
    x[1, 40] = INF
    x[2, 33] = -INF
    y = fake_quant(x, "mxfp4-toolkit", backend=backend)
    assert torch.isnan(y[0, :32]).all() and not torch.isnan(y[0, 32:]).any()
    assert y[1, 40].item() == 6 * 2.0 ** 125 and y[2, 33].item() == -6 * 2.0 ** 125
    for r, c in [(1, 40), (2, 33)]:
        others = torch.cat([y[r, 32:c], y[r, c + 1:]])
        assert (others == 0).all()
        src = torch.cat([x[r, 32:c], x[r, c + 1:]])
        assert torch.equal(torch.signbit(others), src < 0)
    p = encode(x, "mxfp4-toolkit", backend=backend)
    assert p.scales[0, 0].item() == 0xFF and p.scales[1, 1].item() == 125 + 127
    assert_same_bits(decode(p, backend=backend), y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_tiny_blocks(backend):
    # OCP: zero blocks and tiny blocks take 2^-127, an fp32 subnormal (pitfall 13), and keep
    # their values; the toolkit's epsilon gives X = -22 and flushes them to zero (pitfall 11)
    x = torch.zeros(2, 32)
    x[1, 0] = 3 * 2.0 ** -127
    x[1, 1] = -(2.0 ** -128)
    x[1, 2] = 2.0 ** -130
    for fmt in ["mxfp4", "mxfp4-rceil"]:
        y = fake_quant(x, fmt, backend=backend)
        assert_same_bits(y[0], torch.zeros(32))
        assert y[1, :3].tolist() == [3 * 2.0 ** -127, -(2.0 ** -128), 0.0]
        assert encode(x, fmt, backend=backend).scales.tolist() == [[0], [0]]
        assert_same_bits(decode(encode(x, fmt, backend=backend), backend=backend), y)
    y = fake_quant(x, "mxfp4-toolkit", backend=backend)
    assert (y == 0).all() and torch.signbit(y[1, 1])
    assert encode(x, "mxfp4-toolkit", backend=backend).scales.tolist() == [[105], [105]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("special", [NAN, INF, -INF])
def test_nvfp4_nonfinite_tensor_is_nan(backend, special):
    x = torch.randn(3, 40)
    x[2, 7] = special
    assert torch.isnan(fake_quant(x, "nvfp4", backend=backend)).all()
    p = encode(x, "nvfp4", backend=backend)
    assert torch.isnan(p.tensor_scale) and (p.scales == 0x7F).all() and (p.codes == 0).all()
    assert torch.isnan(decode(p, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvfp4_zero_tensor_and_zero_block_scale(backend):
    p = encode(torch.zeros(2, 16), "nvfp4", backend=backend)
    assert p.tensor_scale.item() == 1.0 and (p.scales == 0).all() and (p.codes == 0).all()
    # s = 1e6 / 2688; a block with max 1e-3 has b = e4m3(1e-3 / 6 / s) = 0: signed zeros
    x = torch.zeros(1, 32)
    x[0, 0] = 1e6
    x[0, 16], x[0, 17] = 1e-3, -1e-3
    y = fake_quant(x, "nvfp4", backend=backend)
    assert y[0, 0].item() == pytest.approx(1e6, rel=0.07)
    assert (y[0, 16:] == 0).all() and torch.signbit(y[0, 17])
    p = encode(x, "nvfp4", backend=backend)
    assert p.scales[0, 1].item() == 0 and p.codes[0, 8].item() == 0x80


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mxfp4_by_hand(backend):
    # block max 6 -> X = 0, E8M0 byte 127; nibble = S EE M, element 2i in the low nibble
    vals = [0.5, -1.0, 6.0, -0.0, 1.5, 3.0, -2.0, 4.0]
    x = torch.zeros(1, 32)
    x[0, :8] = torch.tensor(vals)
    p = encode(x, "mxfp4", backend=backend)
    assert p.codes.dtype == torch.uint8 and p.codes.shape == (1, 16)
    assert p.codes[0, :4].tolist() == [0xA1, 0x87, 0x53, 0x6C]
    assert (p.codes[0, 4:] == 0).all()
    assert p.scales.tolist() == [[127]] and p.scales.dtype == torch.uint8
    assert p.tensor_scale is None
    assert_same_bits(decode(p, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_nvfp4_by_hand(backend):
    # amax 2688 -> s = 1; block 0 max 2688 -> b = 448 (0x7E); block 1 max 6 -> b = 1 (0x38)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 2688.0, -448.0
    x[0, 16], x[0, 17], x[0, 18] = 6.0, -0.5, 1.0
    p = encode(x, "nvfp4", backend=backend)
    assert p.codes.shape == (1, 16) and p.scales.shape == (1, 2)
    assert p.scales.tolist() == [[0x7E, 0x38]]
    assert p.tensor_scale.item() == 1.0
    assert p.codes[0, 0].item() == 0xA7         # 6 (0x7) then -1 (0xA): -448 / 448
    assert p.codes[0, 8].item() == 0x97 and p.codes[0, 9].item() == 0x02
    assert_same_bits(decode(p, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_and_shapes(backend, fmt):
    block = mx.BLOCKS[fmt]
    x = torch.randn(3, 5, 45)
    for axis in [0, 1, 2, -1]:
        p = encode(x, fmt, axis, backend=backend)
        L = x.shape[axis]
        Lp = -(-L // block) * block
        rows = x.numel() // L
        assert p.codes.shape == (rows, Lp // 2) and p.scales.shape == (rows, Lp // block)
        assert_same_bits(decode(p, backend=backend), fake_quant(x, fmt, axis, backend=backend))
    for shape in [(7,), (0, 5)]:
        x = torch.randn(shape)
        assert_same_bits(decode(encode(x, fmt, backend=backend), backend=backend),
                         fake_quant(x, fmt, backend=backend))
    assert fake_quant(torch.tensor(-2.5), fmt, backend=backend).shape == ()


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_zero_dim(fmt):
    x = torch.tensor(-2.5)
    assert_same_bits(decode(encode(x, fmt, backend="ref"), backend="ref"), fake_quant(x, fmt, backend="ref"))


# ---------------------------------------------------------------- cpp == ref, randomized

def _sample(seed: int, shape: tuple[int, ...], dtype: torch.dtype, specials: bool) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    lo, hi = (-26, 14) if dtype == torch.float16 else (-150, 126)
    base = rng.integers(lo, hi)
    e = np.clip(base + rng.integers(-12, 4, n), lo - 4, hi + 1)
    x = rng.uniform(1, 2, n) * np.exp2(e.astype(np.float64)) * rng.choice([-1, 1], n)
    x[rng.random(n) < 0.05] = 0.0
    x[rng.random(n) < 0.05] = -0.0
    if specials:
        pick = rng.random(n)
        x[pick < 0.01] = np.nan
        x[(pick >= 0.01) & (pick < 0.02)] = np.inf
        x[(pick >= 0.02) & (pick < 0.03)] = -np.inf
    return torch.from_numpy(x.astype(np.float32)).reshape(shape).to(dtype)


_shapes = st.lists(st.integers(1, 37), min_size=1, max_size=4).filter(lambda s: int(np.prod(s)) <= 6000)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=60, deadline=None)
@given(shape=_shapes, data=st.data(), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from(DTYPES), specials=st.booleans())
def test_cpp_equals_ref(fmt, shape, data, seed, dtype, specials):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = _sample(seed, tuple(shape), dtype, specials)
    y_cpp = fake_quant(x, fmt, axis, backend="cpp")
    y_ref = fake_quant(x, fmt, axis, backend="ref")
    assert y_cpp.dtype == dtype
    assert_same_bits(y_cpp, y_ref)
    p_cpp = encode(x, fmt, axis, backend="cpp")
    p_ref = encode(x, fmt, axis, backend="ref")
    assert_same_packed(p_cpp, p_ref)
    want = fake_quant(x.float(), fmt, axis, backend="ref")
    assert_same_bits(decode(p_cpp, backend="cpp"), want)
    assert_same_bits(decode(p_ref, backend="ref"), want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_equals_ref_large(fmt, dtype):
    # many rows, rows spanning several 1024-element chunks with a partial last block, one long row
    threads = torch.get_num_threads()
    torch.set_num_threads(2)   # at::parallel_for splits the work even on a 1-core runner
    try:
        for i, shape in enumerate([(300, 1000), (3, 5000), (1, 70001)]):
            x = _sample(1000 + i, shape, dtype, specials=fmt != "nvfp4")
            assert_same_bits(fake_quant(x, fmt, backend="cpp"), fake_quant(x, fmt, backend="ref"))
            assert_same_packed(encode(x, fmt, backend="cpp"), encode(x, fmt, backend="ref"))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- scale-search helpers

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4-rceil"])
def test_chosen_exponents_reproduce_fake_quant(backend, fmt):
    for seed, specials in [(1, False), (2, True), (3, True)]:
        x = _pad(_sample(seed, (24, 100), torch.float32, specials))
        exps = mx.shared_exponent_ref(x, fmt)
        assert exps.shape == (24, 4) and exps.dtype == torch.int32
        assert_same_bits(mx.fake_quant_with_exponent_ref(x, exps), fake_quant(x, fmt, backend=backend))


def test_fake_quant_with_other_exponents():
    x = _pad(_sample(5, (16, 64), torch.float32, False))
    exps = mx.shared_exponent_ref(x, "mxfp4").clamp(-126, 126)
    for delta in [-1, 1]:
        e = exps + delta
        want = torch.from_numpy(_ocp_oracle(x.numpy(), e.numpy()))
        assert_same_bits(mx.fake_quant_with_exponent_ref(x, e), want)
    e = exps.clone()
    e[0, 0] = 128                                          # the NaN scale
    y = mx.fake_quant_with_exponent_ref(x, e)
    assert torch.isnan(y[0, :32]).all() and not torch.isnan(y[0, 32:]).any()


def test_helpers_reject_bad_input():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="no shared exponent"):
        mx.shared_exponent_ref(x, "nvfp4")
    with pytest.raises(ValueError, match="multiple of the block"):
        mx.shared_exponent_ref(torch.randn(2, 40), "mxfp4")
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        mx.fake_quant_with_exponent_ref(x, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="-127, 127"):
        mx.fake_quant_with_exponent_ref(x, torch.full((2, 2), -128, dtype=torch.int32))
    with pytest.raises(ValueError, match="integer"):
        mx.fake_quant_with_exponent_ref(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="float32"):
        mx.fake_quant_with_exponent_ref(x.double(), torch.zeros(2, 2, dtype=torch.int32))


# ---------------------------------------------------------------- bad packed input

@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rejects_malformed_packed(backend):
    good = encode(torch.randn(2, 64), "mxfp4", backend=backend)
    bad = [
        (Packed("mxfp4", (2, 64), 1, good.codes[:, :16], good.scales, None), "Lp|codes"),
        (Packed("mxfp4", (2, 64), 1, good.codes, good.scales[:, :1], None), "scales"),
        (Packed("mxfp4", (2, 64), 1, good.codes, good.scales.float(), None), "scales"),
        (Packed("mxfp4", (2, 64), 1, good.codes, None, None), "scales"),
        (Packed("mxfp4", (2, 64), 1, good.codes.to(torch.int32), good.scales, None), "codes"),
        (Packed("mxfp4", (2, 64), 1, good.codes, good.scales, torch.tensor(1.0)), "tensor_scale"),
    ]
    nv = encode(torch.randn(2, 64), "nvfp4", backend=backend)
    bad += [
        (Packed("nvfp4", (2, 64), 1, nv.codes, nv.scales, None), "tensor_scale"),
        (Packed("nvfp4", (2, 64), 1, nv.codes, nv.scales, torch.ones(2)), "tensor_scale"),
        (Packed("nvfp4", (2, 64), 1, nv.codes, good.scales, nv.tensor_scale), "scales"),
    ]
    for p, msg in bad:
        with pytest.raises((ValueError, RuntimeError), match=msg):
            decode(p, backend=backend)


def test_kernel_rejects_bad_arguments():
    from lpq.formats._build import load_kernel

    ext = load_kernel("mx")
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="unknown format"):
        ext.fake_quant(x, "mxfp8", torch.empty_like(x))
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.fake_quant(x.t(), "mxfp4", torch.empty(64, 4))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ext.encode(x.double(), "mxfp4")
    with pytest.raises(RuntimeError, match="2-D"):
        ext.encode(x.reshape(2, 2, 64), "nvfp4")
    with pytest.raises(RuntimeError, match="out must be"):
        ext.fake_quant(x, "mxfp4", torch.empty(4, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown MX-family format"):
        mx.fake_quant_ref(x, "hif4")
