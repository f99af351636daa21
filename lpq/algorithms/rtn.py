"""Round-to-nearest: the baseline every other step is measured against."""
from __future__ import annotations

from torch import Tensor

from lpq.algorithms import grid


def rtn_quantize(weight: Tensor, fmt: str, scale_search: bool = False, importance: Tensor | None = None) -> Tensor:
    """Quantize a (out, in) weight along `in` by the format's own scale rule, or by scale search.

    importance: per-input-column weights of the squared error for the search, e.g. diag(H).
    """
    return grid.fake_quant(weight, fmt, search=scale_search, weight=importance)
