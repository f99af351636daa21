import pytest
import torch
from torch import nn

from lpq.algorithms.smoothquant import (fold_into_linear_outputs, fold_into_norm, scale_linear_inputs,
                                        smooth_scales)


def test_folding_into_a_norm_keeps_the_function():
    torch.manual_seed(0)
    norm, a, b = nn.RMSNorm(32), nn.Linear(32, 16), nn.Linear(32, 8)
    nn.init.uniform_(norm.weight, 0.5, 2)
    x = torch.randn(4, 32) * torch.linspace(0.1, 30, 32)
    before = (a(norm(x)), b(norm(x)))
    s = smooth_scales((norm(x)).abs().amax(0), [a.weight, b.weight], alpha=0.5)
    fold_into_norm(norm, s)
    scale_linear_inputs([a, b], s)
    assert torch.allclose(a(norm(x)), before[0], atol=1e-4) and torch.allclose(b(norm(x)), before[1], atol=1e-4)


def test_folding_into_a_producer_linear_keeps_the_function():
    torch.manual_seed(1)
    up, down = nn.Linear(16, 32), nn.Linear(32, 16)
    x = torch.randn(4, 16)
    before = down(up(x))
    s = smooth_scales(up(x).abs().amax(0), [down.weight], alpha=0.8)
    fold_into_linear_outputs(up, s)
    scale_linear_inputs([down], s)
    assert torch.allclose(down(up(x)), before, atol=1e-4)


def test_smoothing_flattens_activation_outliers():
    act = torch.tensor([100.0, 1.0, 1.0, 1.0])
    s = smooth_scales(act, [torch.ones(3, 4)], alpha=0.5)
    assert (act / s).max() / (act / s).min() < act.max() / act.min()
    with pytest.raises(ValueError):
        smooth_scales(act, [torch.ones(3, 4)], alpha=1.5)
    with pytest.raises(ValueError, match="no affine weight"):
        fold_into_norm(nn.LayerNorm(4, elementwise_affine=False), s)
