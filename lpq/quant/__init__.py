"""The quantized-model runtime: recipes, quantizers, QuantLinear, fused experts, attention, quantize_model."""
from lpq.quant.apply import (PlanEntry, collect_stats, plan_quantization, quant_enabled, quantize_model,
                             set_input_transform, set_quant_enabled, set_stats_tracking)
from lpq.quant.attention import AttentionQuantizers, QuantWanAttnProcessor
from lpq.quant.experts import QuantExperts
from lpq.quant.linear import QuantLinear
from lpq.quant.quantizer import TensorQuantizer, update_delayed_scales
from lpq.quant.recipe import (AttentionRecipe, QuantizerSpec, QuantRecipe, Reduction, Scaling, ScaleTarget)
from lpq.quant.scaling import compute_scale
from lpq.quant.transforms import InputTransform

__all__ = ["AttentionQuantizers", "AttentionRecipe", "InputTransform", "PlanEntry", "QuantExperts", "QuantLinear",
           "QuantRecipe", "QuantWanAttnProcessor", "QuantizerSpec", "Reduction", "ScaleTarget", "Scaling",
           "TensorQuantizer", "collect_stats", "compute_scale", "plan_quantization", "quant_enabled", "quantize_model",
           "set_input_transform", "set_quant_enabled", "set_stats_tracking", "update_delayed_scales"]
