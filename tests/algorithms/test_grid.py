import pytest
import torch

from lpq import formats
from lpq.algorithms import grid


def _data(rows=16, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[0, 5] = 40.0        # outliers exercise the micro-exponents and the MX saturation
    x[3, 100] = -0.001
    x[5, :64] = 0.0       # an all-zero block
    return x


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "mxfp4-rceil"])
def test_default_scales_match_the_format_reference(fmt):
    x = _data()
    assert torch.equal(grid.fake_quant(x, fmt), formats.fake_quant(x, fmt, backend="ref"))


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4"])
def test_scale_search_never_worse_than_the_default_rule(fmt):
    x = _data(seed=1)
    w = torch.rand(x.shape[1]) + 0.1
    err = lambda q: (((q - x) ** 2) * w).sum(1)
    default, searched = grid.fake_quant(x, fmt), grid.fake_quant(x, fmt, search=True, weight=w)
    assert torch.all(err(searched) <= err(default) + 1e-6)
    assert err(searched).sum() < err(default).sum()


def test_searched_hif4_values_lie_on_the_hif4_grid():
    x = _data(seed=2)
    S, d = grid.hif4_search_meta(x)
    q = grid.quantize(x, grid._hif4_elem(S, d), "hif4")
    units = (q.view(16, -1, 64).abs() / (S.unsqueeze(-1) * 2.0 ** d)) * 4
    assert torch.equal(units, units.round()) and units.max() <= 7
    # E6M2: a 2-bit mantissa.
    m = S / 2.0 ** torch.floor(torch.log2(S)) * 4
    assert torch.equal(m, m.round())
    # micro-exponents: E1_8 constant over 8 elements, d - E1_8 in {0, 1} per 4
    e8 = d.view(16, -1, 8, 8).amin(-1)
    assert torch.all((d.view(16, -1, 8, 8) - e8.unsqueeze(-1) >= 0) & (d.view(16, -1, 8, 8) - e8.unsqueeze(-1) <= 1))


def test_mx_grid_is_idempotent():
    x = _data(seed=3)
    q = grid.fake_quant(x, "mxfp4", search=True)
    assert torch.equal(grid.fake_quant(q, "mxfp4"), q)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="no grid"):
        grid.fake_quant(torch.zeros(2, 64), "hif8")
    with pytest.raises(ValueError, match="multiple of the block"):
        grid.default_scales(torch.zeros(2, 63), "hif4")
