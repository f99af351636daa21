import math

import pytest
import torch

from lpq.formats import fake_quant
from lpq.quant import QuantizerSpec, TensorQuantizer, compute_scale, update_delayed_scales


def _scale(x: torch.Tensor, spec: QuantizerSpec) -> float:
    amax = x.abs().amax().reshape(1)
    rms = x.float().square().mean().sqrt().reshape(1)
    return float(compute_scale(amax, rms, spec))


def test_window_rule_puts_rms_in_the_fine_window_with_power_of_two():
    spec = QuantizerSpec("hif8", scaling="current")
    for std in (1e-4, 3e-2, 1.0, 700.0):
        x = torch.randn(4096) * std
        s = _scale(x, spec)
        assert math.log2(s).is_integer()
        rms = float(x.square().mean().sqrt())
        assert 2 ** -0.5 <= rms * s <= 2 ** 0.5


def test_window_rule_keeps_amax_below_overflow():
    # amax/RMS > 2^15 (reachable with delayed scaling, where both come from a history): the RMS
    # alone would ask for 2^10, which would send amax to Inf; the guard lowers the scale.
    spec = QuantizerSpec("hif8", scaling="current")
    amax, rms = torch.tensor([1e4]), torch.tensor([1e-3])
    assert float(compute_scale(amax, rms, spec)) == 2.0            # 1e4 * 2 <= 32768 < 1e4 * 4
    margin = QuantizerSpec("hif8", scaling="current", margin=2)
    assert float(compute_scale(amax, rms, margin)) == 0.5
    x = torch.tensor([1e4, 1e-3, -1e-3])
    assert not torch.isinf(fake_quant(x * 2.0, "hif8")).any()


def test_amax_rule_maps_amax_to_target():
    x = torch.randn(1000) * 3
    amax = float(x.abs().amax())
    exact = QuantizerSpec("hif8", scaling="current", target="amax", power_of_two=False)
    assert _scale(x, exact) == pytest.approx(32768 / amax)
    pow2 = QuantizerSpec("hif8", scaling="current", target="amax", amax_target=256.0)
    s = _scale(x, pow2)
    assert math.log2(s).is_integer() and 128 < amax * s <= 256


def test_zero_tensor_gets_unit_scale():
    assert _scale(torch.zeros(10), QuantizerSpec("hif8", scaling="current")) == 1.0


def test_tapered_hif8_prefers_the_window_rule():
    # Why the window rule is the default: HiF8 has 3 mantissa bits only near 2^0, so pushing
    # amax to 2^15 (the FP8 habit) moves the bulk into the 1-2 mantissa-bit binades.
    torch.manual_seed(0)
    x = torch.randn(1 << 14) * 0.01

    def rel_err(spec):
        y = TensorQuantizer(spec, "input")(x)
        return float((y - x).square().mean() / x.square().mean())

    window = rel_err(QuantizerSpec("hif8", scaling="current"))
    to_max = rel_err(QuantizerSpec("hif8", scaling="current", target="amax"))
    none = rel_err(QuantizerSpec("hif8"))
    assert window < none and window < to_max / 4


def test_scaled_quantization_is_exact_power_of_two_arithmetic():
    torch.manual_seed(1)
    x = torch.randn(8, 64) * 1e-3
    q = TensorQuantizer(QuantizerSpec("hif8", scaling="current"), "input")
    y = q(x)
    s = q.scale
    assert torch.equal(y, fake_quant(x * s, "hif8") / s)


def _steps():
    torch.manual_seed(2)
    return [torch.randn(16, 64) * m for m in (1.0, 40.0, 0.01, 3.0, 500.0)]


def test_delayed_history_rolls_and_scale_lags_current_by_one_step():
    delayed = TensorQuantizer(QuantizerSpec("hif8", scaling="delayed", history_len=3, reduction="most_recent"),
                              "input").train()
    current = TensorQuantizer(QuantizerSpec("hif8", scaling="current"), "input").train()
    amaxes, current_scales = [], []
    for t, x in enumerate(_steps()):
        update_delayed_scales(delayed)          # what the model's pre-forward hook does
        y = delayed(x)
        current(x)
        if t == 0:
            # no history yet: the first step falls back to current scaling
            assert torch.equal(y, current(x))
        else:
            assert torch.equal(delayed.scale, current_scales[-1])
            s = current_scales[-1]
            assert torch.equal(y, fake_quant(x * s, "hif8") / s)
        amaxes.append(x.abs().amax())
        current_scales.append(current.scale.clone())
    update_delayed_scales(delayed)
    assert torch.equal(delayed.amax_history[:, 0], torch.stack(amaxes[::-1][:3]))
    assert torch.equal(delayed.scale, current_scales[-1])


def test_delayed_max_reduction_uses_the_largest_amax_in_the_window():
    q = TensorQuantizer(QuantizerSpec("hif8", scaling="delayed", history_len=2, target="amax"), "input").train()
    xs = _steps()
    for x in xs[:3]:
        update_delayed_scales(q)
        q(x)
    update_delayed_scales(q)
    # the window holds steps 1 and 2; step 1 (x40) dominates
    amax = xs[1].abs().amax().reshape(1)
    assert torch.equal(q.scale, compute_scale(amax, torch.zeros(1), q.spec))


def test_delayed_state_frozen_in_eval_and_saved_in_state_dict():
    q = TensorQuantizer(QuantizerSpec("hif8", scaling="delayed"), "input").train()
    for x in _steps()[:2]:
        update_delayed_scales(q)
        q(x)
    update_delayed_scales(q)
    q.eval()
    before = q.scale.clone()
    q(_steps()[4])
    update_delayed_scales(q)
    assert torch.equal(q.scale, before)
    state = q.state_dict()
    assert set(state) == {"amax_history", "rms_history", "scale"}
    fresh = TensorQuantizer(q.spec, "input")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scale, before)


def test_grouped_quantizer_scales_each_slice():
    q = TensorQuantizer(QuantizerSpec("hif8", scaling="current"), "weight", groups=3)
    w = torch.randn(3, 4, 8) * torch.tensor([1e-3, 1.0, 1e2]).view(3, 1, 1)
    y = q(w)
    for g in range(3):
        s = q.scale[g]
        assert torch.equal(y[g], fake_quant(w[g] * s, "hif8") / s)
    with pytest.raises(ValueError, match="3 groups"):
        q(torch.randn(2, 4, 8))


def test_stats_are_opt_in_and_count_overflow_and_coarse_values():
    q = TensorQuantizer(QuantizerSpec("hif8"), "input")
    x = torch.tensor([1.0, 300.0, 5e4, 1e-9])
    q(x)
    assert q.last_stats is None
    q.track_stats = True
    q(x)
    assert q.last_stats["overflow"] == 0.25      # 5e4 -> Inf
    assert q.last_stats["flushed"] == 0.25       # 1e-9 -> 0
    assert q.last_stats["coarse"] == 0.5         # 300 and 5e4 have exponent >= 8
    assert q.last_stats["amax"] == 5e4


def test_p_amax_target_does_not_move_with_the_sequence_length():
    # Causal softmax probabilities: row 0 is always exactly 1, so the amax rule gives P the same scale
    # at any length, while the RMS-based window rule drifts as the rows lengthen (P's RMS falls).
    torch.manual_seed(0)
    amax_rule = QuantizerSpec("hif8", scaling="current", target="amax", amax_target=8.0)
    window = QuantizerSpec("hif8", scaling="current")
    scales = {"amax": [], "window": []}
    for n in (64, 512, 2048):
        scores = torch.randn(2, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        p = scores.softmax(-1)
        scales["amax"].append(_scale(p, amax_rule))
        scales["window"].append(_scale(p, window))
        y = fake_quant(p * scales["amax"][-1], "hif8") / scales["amax"][-1]
        big = p >= 2 ** -6                       # 3 mantissa bits from 2^-6 up to 1 (scaled [2^-3, 2^3])
        assert ((y[big] - p[big]).abs() <= p[big] * 2 ** -4).all()
    assert scales["amax"] == [8.0, 8.0, 8.0]
    assert scales["window"][0] < scales["window"][1] < scales["window"][2]


def test_window_center_moves_the_rms_by_powers_of_two():
    x = torch.randn(8192) * 0.03
    rms = float(x.square().mean().sqrt())
    for c in (-1, 0, 1, 2):
        s = _scale(x, QuantizerSpec("hif8", scaling="current", window_center=c))
        assert 2 ** (c - 0.5) <= rms * s <= 2 ** (c + 0.5)
