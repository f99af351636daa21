"""The quantized-model runtime: recipes, quantizers, QuantLinear, fused experts, attention, quantize_model.

The recipe dataclasses (lpq.quant.recipe) load without torch, so recipes validate and `--help`
stays light; everything else loads on first use.
"""
from importlib import import_module
from typing import Any

from lpq.quant.recipe import (AttentionRecipe, QKRotation, QuantizerSpec, QuantRecipe, Reduction, Scaling,
                              ScaleTarget)

# name -> module that defines it (imported on first use: it imports torch)
_LAZY = {
    "PlanEntry": "apply", "collect_stats": "apply", "plan_quantization": "apply", "quant_enabled": "apply",
    "quantize_model": "apply", "set_input_transform": "apply", "set_quant_enabled": "apply",
    "set_stats_tracking": "apply", "AttentionQuantizers": "attention", "QuantWanAttnProcessor": "attention",
    "QuantExperts": "experts", "QuantLinear": "linear", "TensorQuantizer": "quantizer",
    "update_delayed_scales": "quantizer", "compute_scale": "scaling", "InputTransform": "transforms",
}

__all__ = ["AttentionRecipe", "QKRotation", "QuantRecipe", "QuantizerSpec", "Reduction", "ScaleTarget", "Scaling", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"lpq.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lpq.quant' has no attribute {name!r}")
