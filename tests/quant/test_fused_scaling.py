"""fake_quant_scaled and fake_quant_stats (the one-pass HiF8 kernels behind TensorQuantizer's per-tensor
scaling) must equal the unfused expression `(fake_quant(x.float() * s) / s).to(x.dtype)` bit for bit and
measure what the plain-PyTorch statistics measure; both give the identity (straight-through) gradient,
and a quantizer on the kernels behaves bit for bit as one on the reference backend."""
import math

import pytest
import torch

from lpq.formats import fake_quant
from lpq.formats.api import fake_quant_scaled, fake_quant_scaled_ste, fake_quant_stats, moments
from lpq.formats._build import load_kernel
from lpq.quant import QuantizerSpec, TensorQuantizer, update_delayed_scales

needs_kernel = pytest.mark.skipif(load_kernel("hif8") is None, reason="HiF8 C++ kernel unavailable")

# Powers of two across the range the kernel takes, including ones that push products into float32's
# subnormals or past HiF8's overflow.
SCALES = [2.0 ** k for k in (-126, -100, -40, -7, -1, 0, 1, 5, 13, 40, 100, 126)]


def _unfused(x: torch.Tensor, scale: float) -> torch.Tensor:
    s = torch.tensor(scale, dtype=torch.float32)
    return (fake_quant(x.float() * s, "hif8", backend="ref") / s).to(x.dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN matches any NaN (PyTorch's own float32 -> bfloat16
    NaN bits differ between its scalar and vector code)."""
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


def _random_values(dtype: torch.dtype, n: int = 1 << 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.float32:
        bits = torch.randint(-2 ** 31, 2 ** 31, (n,), dtype=torch.int64, generator=g).to(torch.int32)
        return bits.view(torch.float32)
    return torch.randint(-2 ** 15, 2 ** 15, (n,), dtype=torch.int32, generator=g).to(torch.int16).view(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", SCALES)
def test_kernel_matches_unfused_on_random_bit_patterns(dtype, scale):
    x = _random_values(dtype)
    y = fake_quant_scaled(x, "hif8", scale, backend="cpp")
    assert y.dtype == dtype and y.shape == x.shape
    assert _same_bits(y, _unfused(x, scale))


@needs_kernel
def test_kernel_covers_every_bfloat16_value():
    x = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for scale in SCALES:
        assert _same_bits(fake_quant_scaled(x, "hif8", scale, backend="cpp"), _unfused(x, scale))


@pytest.mark.parametrize("backend", ["ref", "auto"])
@pytest.mark.parametrize("scale", [0.75, 3.0, 2.0 ** 127, 2.0 ** -130])
def test_other_scales_take_the_unfused_path(backend, scale):
    x = torch.randn(3, 257) * 10
    assert _same_bits(fake_quant_scaled(x, "hif8", scale, backend=backend), _unfused(x, scale))


def test_float16_and_non_contiguous_inputs():
    x = (torch.randn(64, 48) * 4).half()
    assert _same_bits(fake_quant_scaled(x, "hif8", 8.0), _unfused(x, 8.0))
    xt = (torch.randn(48, 64) * 4).bfloat16().t()
    y = fake_quant_scaled(xt, "hif8", 0.25, axis=-2)
    assert y.shape == xt.shape and _same_bits(y, _unfused(xt, 0.25))


@needs_kernel
def test_kernel_rejects_a_scale_that_is_not_a_power_of_two():
    ext = load_kernel("hif8")
    x = torch.randn(8)
    with pytest.raises(RuntimeError, match="power of two"):
        ext.fake_quant_scaled(x, "hif8", 3.0, torch.empty_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0 ** -20, 1.0, 2.0 ** 20, 2.0 ** 120])
def test_straight_through_gradient_is_the_identity_on_both_paths(dtype, scale):
    # Gradients small and large enough that g / s would underflow or overflow float32 for some scales:
    # the straight-through gradient passes them unchanged, fused or not.
    torch.manual_seed(0)
    x = (torch.randn(4, 300) * 3).to(dtype)
    g = (torch.randn(4, 300) * torch.exp2(torch.randint(-140, 120, (4, 300)).float())).to(dtype)

    a = x.clone().requires_grad_()
    fake_quant_scaled_ste(a, "hif8", scale).backward(g)
    assert _same_bits(a.grad, g)

    spec = QuantizerSpec("hif8", scaling="current")
    for track in (False, True):   # tracking statistics takes the fused statistics pass
        q = TensorQuantizer(spec, "input").train()
        q.track_stats = track
        b = x.clone().requires_grad_()
        y = q(b)
        assert _same_bits(y.detach(), fake_quant_scaled(x, "hif8", float(q.scale)))
        y.backward(g)
        assert _same_bits(b.grad, g)


def _reference_stats(x: torch.Tensor, scale: float) -> dict:
    """The statistics of fake_quant_stats written out in plain PyTorch (float64 sum of squares)."""
    xs = x.float() * torch.tensor(scale, dtype=torch.float32)
    ys = fake_quant(xs, "hif8", backend="ref")
    finite = torch.isfinite(xs)
    amax = x.float().abs().amax()
    return {"amax": amax, "sumsq": x.double().square().sum(), "overflow": (torch.isinf(ys) & finite).sum(),
            "flushed": ((ys == 0) & (xs != 0)).sum(), "coarse": ((xs.abs() >= 256) & finite).sum()}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0 ** -100, 2.0 ** -7, 1.0, 2.0 ** 13, 2.0 ** 100])
def test_fused_statistics_kernel_matches_the_reference(dtype, scale):
    # One C++ pass: the quantized values bit for bit, amax and the counts exactly, the float64 sum of
    # squares to float64 rounding (a different summation order); finite random bit patterns of every
    # magnitude, then NaN/Inf.
    x = _random_values(dtype, 40_000)
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))
    for case in (x, torch.cat([x, torch.tensor([float("inf"), -3.0, float("nan")], dtype=dtype)])):
        y, st = fake_quant_stats(case, "hif8", scale, counts=True, backend="cpp")
        assert _same_bits(y, _unfused(case, scale))
        ref = _reference_stats(case, scale)
        assert _same_bits(st["amax"].reshape(1), ref["amax"].reshape(1))
        for k in ("overflow", "flushed", "coarse"):
            assert int(st[k]) == int(ref[k]), k
        got, want = float(st["sumsq"]), float(ref["sumsq"])
        if math.isfinite(want):
            assert got == pytest.approx(want, rel=1e-12)
        else:   # Inf in x: Inf; Inf and NaN: NaN
            assert math.isnan(got) == math.isnan(want) and (math.isnan(want) or got == want)


@needs_kernel
def test_fused_pass_writes_bfloat16_exactly_and_measures_without_quantizing():
    torch.manual_seed(0)
    x = torch.randn(300, 77) * 40
    y, st = fake_quant_stats(x, "hif8", 2.0 ** -3, out_dtype=torch.bfloat16, backend="cpp")
    assert y.dtype == torch.bfloat16 and _same_bits(y, _unfused(x, 2.0 ** -3).bfloat16())
    assert torch.equal(y.float(), _unfused(x, 2.0 ** -3))       # exact: no rounding in the narrowing
    amax, sumsq = moments(x, backend="cpp")
    assert float(amax) == float(x.abs().amax()) == float(st["amax"])
    assert float(sumsq) == pytest.approx(float(x.double().square().sum()), rel=1e-12)
    assert float(sumsq) == float(st["sumsq"])


@needs_kernel
def test_fused_statistics_do_not_depend_on_the_thread_count():
    x = torch.randn(5, 70_001) * 3
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(fake_quant_stats(x, "hif8", 4.0, counts=True, backend="cpp"))
    finally:
        torch.set_num_threads(before)
    (y1, s1), (y2, s2) = results
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)


# The scale rules the shipped HiF8 recipes use (docs/train.md, "Scale rules per role"): the default
# window, the weights' +1, the inputs' and K's -1, Q's +2 and P's amax target 2^3.
RULES = {"window0": {}, "window+1": {"window_center": 1}, "window-1": {"window_center": -1},
         "window+2": {"window_center": 2}, "amax2^3": {"target": "amax", "amax_target": 8.0}}


@pytest.mark.parametrize("scaling", ["current", "delayed"])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("rule", list(RULES))
def test_quantizer_matches_the_reference_backend_bit_for_bit(scaling, track, rule, monkeypatch):
    # The quantizer's fused path (C++ statistics + quantization in one pass) against the same
    # quantizer on the plain-PyTorch reference (LPQ_BACKEND=ref): outputs, gradients, scales,
    # histories and tracked statistics identical over several delayed-scaling steps, for every
    # scale rule a shipped recipe uses.
    torch.manual_seed(0)
    spec = QuantizerSpec("hif8", scaling=scaling, history_len=3, **RULES[rule])
    xs = [(torch.randn(16, 96) * 10.0 ** k).to(dt) for k, dt in ((0, torch.bfloat16), (3, torch.float32),
                                                                  (-2, torch.bfloat16), (1, torch.float32))]

    def run(backend: str):
        monkeypatch.setenv("LPQ_BACKEND", backend)
        q = TensorQuantizer(spec, "input").train()
        q.track_stats = track
        outs = []
        for x in xs:
            a = x.clone().requires_grad_()
            y = q(a)
            y.backward(torch.ones_like(y))
            outs.append((y.detach(), a.grad, dict(q.last_stats or {})))
            update_delayed_scales(q)
        return q, outs

    fused, f_out = run("auto")
    ref, r_out = run("ref")
    for (yf, gf, sf), (yr, gr, sr) in zip(f_out, r_out):
        assert _same_bits(yf, yr) and _same_bits(gf, gr)
        assert sf.keys() == sr.keys()
        for k in sf:
            assert sf[k] == pytest.approx(sr[k], rel=1e-12) if isinstance(sf[k], float) else sf[k] == sr[k], k
    for name in ("scale", "amax_history", "rms_history"):
        assert torch.equal(getattr(fused, name), getattr(ref, name)), name


def test_quantizer_writes_bfloat16_for_matmul_operands_under_autocast():
    # A weight or linear input quantized in training under bfloat16 autocast comes out as bfloat16 (the
    # matmul would cast it anyway; the values are exact); gradients flow back in the input's dtype.
    torch.manual_seed(0)
    w = (torch.randn(32, 48) * 0.05).requires_grad_()
    for role, expect in (("weight", torch.bfloat16), ("grad", torch.float32)):
        q = TensorQuantizer(QuantizerSpec("hif8", scaling="current"), role).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = q(w)
        assert y.dtype == expect
        assert torch.equal(y.float(), fake_quant_scaled(w.detach(), "hif8", float(q.scale)))
        y.float().sum().backward()
        assert w.grad.dtype == torch.float32 and torch.equal(w.grad, torch.ones_like(w))
        w.grad = None
    q = TensorQuantizer(QuantizerSpec("hif8", scaling="current"), "weight").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(w).dtype == torch.float32      # eval: cached weights are reused outside autocast


def test_batched_delayed_update_matches_one_quantizer_at_a_time():
    # update_delayed_scales updates all quantizers of one spec together; the result must be what
    # updating each on its own gives, for several specs, group counts and a quantizer left idle.
    torch.manual_seed(0)
    specs = [QuantizerSpec("hif8", scaling="delayed", history_len=4),
             QuantizerSpec("hif8", scaling="delayed", history_len=3, reduction="most_recent", margin=1)]

    def make() -> torch.nn.ModuleList:
        return torch.nn.ModuleList([TensorQuantizer(specs[i % 2], "input", groups=1 + i % 3).train()
                                    for i in range(7)])

    batched, single = make(), make()
    for step in range(5):
        for i in range(7):
            if i == 3 and step % 2:
                continue   # idle this step: its state must not move
            x = torch.randn(1 + i % 3, 40) * 10.0 ** (i - 3)
            assert _same_bits(batched[i](x), single[i](x))
        update_delayed_scales(batched)
        for q in single:
            update_delayed_scales(q)
    for a, b in zip(batched, single):
        for name in ("amax_history", "rms_history", "scale", "amax_pending", "rms_pending"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_linears_sharing_an_input_quantize_it_once(scaling, monkeypatch):
    # q/k/v (and gate/up) see one tensor: its first input quantizer's result is reused by the others,
    # with the same outputs, gradients, scaling state and statistics as quantizing it three times.
    import lpq.quant.quantizer as quantizer_module

    calls = []
    real = quantizer_module.fake_quant_stats
    monkeypatch.setattr(quantizer_module, "fake_quant_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = QuantizerSpec("hif8", scaling=scaling, history_len=4)

    def run(share: bool):
        qs = [TensorQuantizer(spec, "input").train() for _ in range(3)]
        for q in qs:
            q.track_stats = True
        results = []
        for step in range(3):
            torch.manual_seed(step)
            x = (torch.randn(8, 64) * 3).requires_grad_()
            ys = [q(x if share else x.clone()) for q in qs]
            sum(y.sum() * (i + 1) for i, y in enumerate(ys)).backward()
            results.append(([y.detach() for y in ys], x.grad, [dict(q.last_stats) for q in qs]))
            for q in qs:
                update_delayed_scales(q)
        return qs, results

    calls.clear()
    shared, r_shared = run(True)
    shared_calls = len(calls)
    calls.clear()
    alone, r_alone = run(False)
    assert len(calls) == 3 * shared_calls == 9
    for (ya, ga, sa), (yb, gb, sb) in zip(r_shared, r_alone):
        assert all(_same_bits(a, b) for a, b in zip(ya, yb)) and torch.equal(ga, gb) and sa == sb
    for a, b in zip(shared, alone):
        for name in ("scale", "amax_history", "rms_history"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    x = torch.randn(8, 64)
    q = shared[0]
    q(x)
    x.mul_(2)                       # modified in place: not the same tensor any more
    assert _same_bits(shared[1](x), fake_quant_scaled(x, "hif8", float(shared[1].scale)))


def test_the_shared_input_cache_keeps_no_activation_alive():
    """The cache of the last input quantization lets go of its result with the input: under
    activation checkpointing the model drops a block's activations, and the cache must not keep the
    last one (and its quantized copy) through the backward pass."""
    import gc
    import weakref

    q = TensorQuantizer(QuantizerSpec("hif8", scaling="delayed", history_len=4), "input").train()
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64) @ w            # an activation: made by the model, not a leaf
    y = q(x)
    assert q(x) is y                      # the second linear of the pair reuses the first's result
    y_ref, x_ref = weakref.ref(y), weakref.ref(x)
    del x, y
    gc.collect()
    assert x_ref() is None and y_ref() is None


def test_training_weight_quantization_reuses_one_buffer():
    # A training-mode weight quantization writes into the same memory every step (no fresh pages),
    # with the values a fresh quantization gives; eval mode lets the buffer go.
    torch.manual_seed(0)
    q = TensorQuantizer(QuantizerSpec("hif8", scaling="current"), "weight").train()
    w = (torch.randn(64, 32) * 0.05).requires_grad_()
    first = q(w)
    ptr = first.data_ptr()
    with torch.no_grad():
        w.mul_(1.5)
    second = q(w)
    assert second.data_ptr() == ptr
    assert _same_bits(second.detach(), fake_quant_scaled(w.detach(), "hif8", float(q.scale)))
    second.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    q.eval()
    assert q._out is None and q(w).data_ptr() != ptr
