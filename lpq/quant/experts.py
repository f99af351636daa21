"""Quantized fused MoE experts (transformers 5 `Qwen3MoeExperts`-style 3-D expert weights).

The experts are one module holding `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) and calling
`F.linear(x, gate_up_proj[e])` per expert, so swapping nn.Linear misses them. QuantExperts shares
those parameters (same state-dict keys) and runs the per-expert loop with each expert's weight and
input quantized along the reduction dim; weight scales are per expert. The experts' input is one
tensor for all experts (rows are routed after quantization, which is row-wise along H); each
expert's down_proj input has its own scaling group. `set_quantized_weight` and
`weight_prequantized` work as QuantLinear's, per weight name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpq.quant.linear import CachedWeight, QuantizeGrad
from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.recipe import QuantizerSpec


class QuantExperts(nn.Module):
    def __init__(self, experts: nn.Module, *, weight_spec: QuantizerSpec | None, input_spec: QuantizerSpec | None,
                 grad_spec: QuantizerSpec | None = None):
        super().__init__()
        for attr in ("gate_up_proj", "down_proj", "act_fn", "num_experts"):
            if not hasattr(experts, attr):
                raise TypeError(f"{type(experts).__name__} is not a fused-experts module with gate_up_proj/down_proj "
                                f"(missing {attr!r})")
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) or \
                not getattr(experts, "is_concatenated", True):
            raise NotImplementedError(f"{type(experts).__name__}: only concatenated, untransposed, bias-free expert "
                                      f"weights are supported")
        self.gate_up_proj = experts.gate_up_proj
        self.down_proj = experts.down_proj
        self.act_fn = experts.act_fn
        self.num_experts = experts.num_experts
        # The original module (not registered: its parameters are the ones above) runs the
        # unquantized path, so disabling quantization reproduces the model exactly.
        self._float_experts = (experts,)
        e = self.num_experts
        self.gate_up_weight_quantizer = TensorQuantizer(weight_spec, "weight", groups=e) if weight_spec else None
        self.down_weight_quantizer = TensorQuantizer(weight_spec, "weight", groups=e) if weight_spec else None
        self.input_quantizer = TensorQuantizer(input_spec, "input") if input_spec else None
        self.down_input_quantizer = TensorQuantizer(input_spec, "input", groups=e) if input_spec else None
        self.grad_quantizer = TensorQuantizer(grad_spec, "grad") if grad_spec else None
        self.quant_enabled = True
        self._caches = {"gate_up_proj": CachedWeight(), "down_proj": CachedWeight()}
        self.weight_prequantized = {"gate_up_proj": False, "down_proj": False}
        self.train(experts.training)

    def extra_repr(self) -> str:
        prequantized = [n for n, on in self.weight_prequantized.items() if on]
        return f"num_experts={self.num_experts}, quant_enabled={self.quant_enabled}, weight_prequantized={prequantized}"

    def _weight_name(self, name: str) -> str:
        if name not in self._caches:
            raise ValueError(f"QuantExperts weights are 'gate_up_proj' and 'down_proj', got {name!r}")
        return name

    def quantized_weight(self, name: str) -> Tensor:
        """`gate_up_proj` or `down_proj`, quantized (cached in eval mode)."""
        w = getattr(self, self._weight_name(name))
        quantizer = self.gate_up_weight_quantizer if name == "gate_up_proj" else self.down_weight_quantizer
        if quantizer is None:
            return w
        if self.training:
            if torch.is_grad_enabled() and w.requires_grad:
                # The weight is being trained and will leave the grid: later eval forwards quantize it.
                self.weight_prequantized[name] = False
            return quantizer(w)
        if self.weight_prequantized[name]:
            return w.detach()
        return self._caches[name].get(w, quantizer)

    @torch.no_grad()
    def set_quantized_weight(self, name: str, w_q: Tensor) -> None:
        """Use `w_q` (E, out, in), already on the format grid, as weight `name`, bit-exactly; eval
        forwards never re-quantize it (see QuantLinear.set_quantized_weight)."""
        w = getattr(self, self._weight_name(name))
        if w_q.shape != w.shape:
            raise ValueError(f"quantized {name} has shape {tuple(w_q.shape)}, expected {tuple(w.shape)}")
        w.copy_(w_q)
        self.weight_prequantized[name] = True
        self._caches[name].invalidate()

    def structure(self) -> dict:
        """What the state dict does not say (see QuantLinear.structure)."""
        return {"weight_prequantized": dict(self.weight_prequantized)}

    def restore_structure(self, structure: dict) -> None:
        self.weight_prequantized = {n: bool(structure["weight_prequantized"][n]) for n in self._caches}
        self.refresh()

    def refresh(self) -> None:
        for c in self._caches.values():
            c.invalidate()

    def _linear(self, x: Tensor, w: Tensor) -> Tensor:
        y = F.linear(x, w)
        if self.training and self.grad_quantizer is not None and y.requires_grad:
            y = QuantizeGrad.apply(y, self.grad_quantizer)
        return y

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if not self.quant_enabled:
            return self._float_experts[0](hidden_states, top_k_index, top_k_weights)
        x = self.input_quantizer(hidden_states) if self.input_quantizer is not None else hidden_states
        gate_up = self.quantized_weight("gate_up_proj")
        down = self.quantized_weight("down_proj")
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # (E, top_k, tokens): which token picks which expert in which of its top-k slots
            routing = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = routing.sum(dim=(1, 2)).nonzero().flatten().tolist()
        for e in hit:
            slot, token = torch.where(routing[e])
            gate, up = self._linear(x[token], gate_up[e]).chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            if self.down_input_quantizer is not None:
                h = self.down_input_quantizer(h, group=e)
            h = self._linear(h, down[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out
