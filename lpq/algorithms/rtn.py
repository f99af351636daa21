"""Round-to-nearest: the baseline every other weight quantizer is measured against.

`rtn` rounds each weight by the format's own scale rule; `scale_search` is the same step with the
block metadata searched to minimize the output error weighted by diag(H) of the layer's input.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lpq.algorithms.context import BlockContext, LinearGroup, RunContext
from lpq.algorithms.gptq import layer_hessian
from lpq.algorithms.step import Phase, Step, register
from lpq.formats.grid import block_grid, fake_quant
from lpq.quant.recipe import QuantRecipe


def rtn_quantize(weight: Tensor, fmt: str, scale_search: bool = False, importance: Tensor | None = None) -> Tensor:
    """Quantize a (out, in) weight along `in` by the format's own scale rule, or by scale search.

    importance: per-input-column weights of the squared error for the search, e.g. diag(H).
    """
    return fake_quant(weight, fmt, search=scale_search, importance=importance)


@register
class RTN(Step):
    name = "rtn"
    phase = Phase.QUANTIZE
    search: ClassVar[bool] = False

    def check_recipe(self, quant: QuantRecipe) -> None:
        if self.search:
            block_grid(quant.weight.format)     # the search picks among the format's block metadata

    def quantize_group(self, run: RunContext, block: BlockContext, group: LinearGroup) -> None:
        hessian = layer_hessian(block, group.names[0]) if self.search else None
        if hessian is None:
            # The format's own rule is what the runtime's weight quantizer computes: leave the float
            # weights to it, so the export encodes them exactly in every format (NVFP4's per-tensor
            # scale comes from the float weight). A group no calibration input reached (an unrouted
            # expert) has nothing to weight a search by.
            return
        weights = [lin.weight for lin in group.linears]
        W = torch.cat([w.detach().float() for w in weights])
        Q = rtn_quantize(W, run.weight_format, scale_search=True, importance=hessian.diagonal())
        for lin, q in zip(group.linears, Q.split([w.shape[0] for w in weights])):
            lin.set_quantized_weight(q.to(lin.weight.dtype))


@register
class ScaleSearch(RTN):
    name = "scale_search"
    search = True
