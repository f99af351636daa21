"""Exact HiF4 codes for on-grid values whose standard re-encoding differs."""
from __future__ import annotations

import torch

from lpq.formats import grid
from lpq.export.ongrid import encode_on_grid
from lpq.formats import decode, encode
from tests.export.helpers import same_bits


def test_searched_hif4_values_get_exact_codes():
    x = torch.randn(3, 96, 160, generator=torch.Generator().manual_seed(0)) * 0.05
    x[0, :, :64] = 0.0                                  # an all-zero block
    q = grid.fake_quant(x.transpose(1, 2), "hif4", search=True).transpose(1, 2)   # blocks along dim 1
    q[1, 0, 0] = -0.0
    assert not same_bits(decode(encode(q, "hif4", axis=1)), q)       # the plain encoder cannot
    p = encode_on_grid(q, "hif4", axis=1)
    assert p.codes.shape == (3 * 160, 64) and p.scales.shape == (3 * 160, 2, 4)
    assert same_bits(decode(p), q)


def test_values_off_the_grid_have_no_codes():
    assert encode_on_grid(torch.full((4, 64), 0.3), "hif4") is None
    assert encode_on_grid(torch.zeros(4, 64), "mxfp4") is None        # only HiF4 needs the search
