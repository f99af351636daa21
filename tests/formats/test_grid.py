"""Block grids (lpq.formats.grid): the algorithms' view of a format equals the format, bit for bit."""
import pytest
import torch

from lpq import formats
from lpq.formats import grid
from lpq.formats.grid import block_grid, columns
from tests.formats.vectors import assert_same_bits, load_cases

GRID_FORMATS = ["hif4", "mxfp4", "mxfp4-rceil"]
VECTOR_FILE = {"hif4": "hif4_cases.npz", "mxfp4": "mxfp4_cases.npz", "mxfp4-rceil": "mxfp4_cases.npz"}


def _near_powers_of_two() -> torch.Tensor:
    """Values a few ulps around powers of two (and around 6 * 2^k, the MX saturation edge), the cases
    where a float32 log2 picks the wrong binade."""
    base = torch.tensor([2.0 ** e for e in range(-20, 20)] + [6 * 2.0 ** e for e in range(-10, 10)])
    bits = base.view(torch.int32)
    vals = torch.stack([(bits + d).view(torch.float32) for d in (-3, -2, -1, 0, 1, 2, 3)], -1).flatten()
    rows = vals[: vals.numel() // 64 * 64].view(-1, 64)
    signs = torch.where(torch.arange(rows.numel()).view_as(rows) % 3 == 0, -1.0, 1.0)
    return rows * signs


def _inputs(fmt: str):
    """Every golden-vector case (special NaN/Inf blocks included), padded to the block, plus the
    power-of-two edges."""
    block = block_grid(fmt).block
    for name, arrays in load_cases(VECTOR_FILE[fmt]).items():
        yield name, grid.pad(torch.from_numpy(arrays["x"]).float().reshape(-1, arrays["x"].shape[-1]), block)
    yield "near_powers_of_two", _near_powers_of_two()


@pytest.mark.parametrize("fmt", GRID_FORMATS)
def test_default_metadata_rounds_exactly_as_the_format(fmt):
    g = block_grid(fmt)
    for name, x in _inputs(fmt):
        got = g.round(x, g.element_scales(g.default_meta(x)))
        assert_same_bits(got, formats.fake_quant(x, fmt, backend="ref"))
        assert_same_bits(got, formats.fake_quant(x, fmt, backend="cpp"))


@pytest.mark.parametrize("fmt", GRID_FORMATS)
def test_a_search_restricted_to_the_default_candidate_is_the_default_rule(fmt):
    g = block_grid(fmt)
    for name, x in _inputs(fmt):
        w = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1
        searched, default = g.search_meta(x, w, g.only_default), g.default_meta(x)
        for a, b in zip(searched if isinstance(searched, tuple) else (searched,),
                        default if isinstance(default, tuple) else (default,)):
            assert torch.equal(a, b), name
        assert_same_bits(g.round(x, g.element_scales(searched)), formats.fake_quant(x, fmt, backend="ref"))


@pytest.mark.parametrize("fmt", GRID_FORMATS)
def test_rounding_column_by_column_equals_the_whole_tensor(fmt):
    """What GPTQ does: fix the metadata, then round one column at a time."""
    g = block_grid(fmt)
    for name, x in _inputs(fmt):
        scales = g.element_scales(g.search_meta(x))
        whole = g.round(x, scales)
        by_column = torch.cat([g.round(x[:, j:j + 1], columns(scales, j, j + 1)) for j in range(x.shape[1])], 1)
        assert_same_bits(by_column, whole)


def _data(rows=16, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[0, 5] = 40.0        # outliers exercise the micro-exponents and the MX saturation
    x[3, 100] = -0.001
    x[5, :64] = 0.0       # an all-zero block
    return x


@pytest.mark.parametrize("fmt", GRID_FORMATS)
def test_scale_search_never_worse_than_the_default_rule(fmt):
    x = _data(seed=1)
    w = torch.rand(x.shape[1]) + 0.1
    err = lambda q: (((q - x) ** 2) * w).view(x.shape[0], -1, block_grid(fmt).block).sum(-1)
    default, searched = grid.fake_quant(x, fmt), grid.fake_quant(x, fmt, search=True, importance=w)
    assert torch.all(err(searched) <= err(default))
    assert err(searched).sum() < err(default).sum()


def test_searched_hif4_values_lie_on_the_hif4_grid():
    from lpq.formats.hif4 import scale_value

    x = _data(seed=2)
    g = block_grid("hif4")
    code, e8, e16 = g.search_meta(x)
    q = g.round(x, g.element_scales((code, e8, e16)))
    d = (e8.long().repeat_interleave(8, -1) + e16.long().repeat_interleave(4, -1)).float()
    units = q.view(16, -1, 64).abs() / (scale_value(code).unsqueeze(-1) * 2.0 ** d) * 4
    assert torch.equal(units, units.round()) and units.max() <= 7
    assert int(code.max()) < 0xFF


def test_mx_grid_is_idempotent():
    x = _data(seed=3)
    q = grid.fake_quant(x, "mxfp4", search=True)
    assert torch.equal(grid.fake_quant(q, "mxfp4"), q)


def test_formats_without_a_grid_are_refused():
    with pytest.raises(ValueError, match="no block grid.*hif4, mxfp4, mxfp4-rceil"):
        grid.fake_quant(torch.zeros(2, 64), "hif8")
    with pytest.raises(ValueError, match="multiple of"):
        block_grid("hif4").default_meta(torch.zeros(2, 63))
