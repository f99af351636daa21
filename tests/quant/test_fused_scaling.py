"""fake_quant_scaled (the one-pass HiF8 kernel behind TensorQuantizer's per-tensor scaling) must equal
the unfused expression `(fake_quant(x.float() * s) / s).to(x.dtype)` bit for bit; both give the identity
(straight-through) gradient."""
import pytest
import torch

from lpq.formats import fake_quant
from lpq.formats.api import fake_quant_scaled, fake_quant_scaled_ste
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
    for track in (False, True):   # tracking statistics takes the unfused path
        q = TensorQuantizer(spec, "input").train()
        q.track_stats = track
        b = x.clone().requires_grad_()
        y = q(b)
        assert _same_bits(y.detach(), fake_quant_scaled(x, "hif8", float(q.scale)))
        y.backward(g)
        assert _same_bits(b.grad, g)


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_quantizer_output_unchanged_by_fusion(scaling):
    # TensorQuantizer fuses unless it tracks stats; with stats on it runs the unfused code.
    torch.manual_seed(0)
    spec = QuantizerSpec("hif8", scaling=scaling)
    fused, unfused = TensorQuantizer(spec, "input").train(), TensorQuantizer(spec, "input").train()
    unfused.track_stats = True
    for _ in range(3):
        x = (torch.randn(16, 96) * 50).bfloat16()
        assert _same_bits(fused(x), unfused(x))
        update_delayed_scales(fused)
        update_delayed_scales(unfused)
    assert torch.equal(fused.scale, unfused.scale)


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
