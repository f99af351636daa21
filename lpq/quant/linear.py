"""QuantLinear: nn.Linear with fake-quantized weight, input and (in training) output gradient."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.recipe import QuantizerSpec
from lpq.quant.transforms import InputTransform


class QuantizeGrad(torch.autograd.Function):
    """Identity in forward; quantizes the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, y: Tensor, quantizer: TensorQuantizer) -> Tensor:
        ctx.quantizer = quantizer
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.quantizer(grad), None


class CachedWeight:
    """The quantized copy of a parameter, remade only when the parameter changes.

    A change is seen through the parameter's storage, version counter, dtype and shape. Writes
    through `.data` do not bump the version counter: call `invalidate()` after those.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None
        self.key: tuple | None = None

    @staticmethod
    def key_of(w: Tensor) -> tuple:
        return (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))

    def get(self, w: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
        if self.value is None or self.key != self.key_of(w):
            with torch.no_grad():
                self.value = make(w)
            self.key = self.key_of(w)
        return self.value

    def invalidate(self) -> None:
        self.value = None
        self.key = None


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear (same `weight`/`bias` parameters and state-dict keys).

    * eval mode: the quantized weight is computed once and cached; activations are quantized per call;
    * training mode: weight and input are quantized every call with straight-through gradients, and
      the gradient at the output is quantized when a `grad` quantizer is set;
    * `input_transform`: applied to the input before input quantization; it is part of the model's
      function, so it runs even with quantization disabled. An `InputTransform` (Hadamard block +
      SmoothQuant scale) is exported; any other callable works in memory only;
    * `weight_prequantized` (set by `set_quantized_weight`): `weight` is already on the format grid
      and eval forwards use it as it is, so device moves and copies cannot re-quantize it;
    * `quant_enabled = False` gives exactly `F.linear(input_transform(x), weight, bias)`.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, weight_spec: QuantizerSpec | None,
                 input_spec: QuantizerSpec | None, grad_spec: QuantizerSpec | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.weight = weight
        self.bias = bias
        self.weight_quantizer = TensorQuantizer(weight_spec, "weight") if weight_spec else None
        self.input_quantizer = TensorQuantizer(input_spec, "input") if input_spec else None
        self.grad_quantizer = TensorQuantizer(grad_spec, "grad") if grad_spec else None
        self.input_transform: Callable[[Tensor], Tensor] | None = None
        self.quant_enabled = True
        self.weight_prequantized = False
        self._cache = CachedWeight()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_spec: QuantizerSpec | None, input_spec: QuantizerSpec | None,
                    grad_spec: QuantizerSpec | None = None) -> QuantLinear:
        """Wrap `linear`'s own parameters (shared, not copied)."""
        q = cls(linear.weight, linear.bias, weight_spec=weight_spec, input_spec=input_spec, grad_spec=grad_spec)
        return q.train(linear.training)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_enabled={self.quant_enabled}, weight_prequantized={self.weight_prequantized}")

    def is_plain(self) -> bool:
        """No quantizer at all: the module only carries an input transform (protected/excluded linears)."""
        return self.weight_quantizer is None and self.input_quantizer is None and self.grad_quantizer is None

    def quantized_weight(self) -> Tensor:
        """The weight used in forward: cached in eval mode, recomputed (with STE) in training mode."""
        if self.weight_quantizer is None:
            return self.weight
        if self.training:
            if torch.is_grad_enabled() and self.weight.requires_grad:
                # The weight is being trained and will leave the grid: later eval forwards quantize it.
                self.weight_prequantized = False
            return self.weight_quantizer(self.weight)
        if self.weight_prequantized:
            return self.weight.detach()
        return self._cache.get(self.weight, self.weight_quantizer)

    def refresh(self) -> None:
        """Drop the cached quantized weight (needed after writes through `weight.data`)."""
        self._cache.invalidate()

    @torch.no_grad()
    def set_quantized_weight(self, w_q: Tensor) -> None:
        """Use `w_q`, already on the format grid (e.g. from GPTQ), as the weight, bit-exactly.

        `weight` becomes `w_q` (in the weight's dtype) and `weight_prequantized` is set, so eval
        forwards never re-quantize it (fake quantization is not idempotent for every format), also
        after `.to()` or `copy.deepcopy`. A training forward that can train the weight quantizes it
        as usual and clears the flag.
        """
        if w_q.shape != self.weight.shape:
            raise ValueError(f"quantized weight has shape {tuple(w_q.shape)}, expected {tuple(self.weight.shape)}")
        self.weight.copy_(w_q)
        self.weight_prequantized = True
        self._cache.invalidate()

    def structure(self) -> dict:
        """What the state dict does not say: the input transform's shape and whether the weight is
        already on the grid. `restore_structure` of it, then `load_state_dict`, rebuilds the module."""
        t = self.input_transform
        if t is not None and not isinstance(t, InputTransform):
            raise TypeError(f"input_transform is a {type(t).__name__}; only lpq.quant.InputTransform is serializable")
        return {"input_transform": None if t is None else t.structure(), "weight_prequantized": self.weight_prequantized}

    def restore_structure(self, structure: dict) -> None:
        t = structure["input_transform"]
        self.input_transform = None if t is None else InputTransform.from_structure(t).to(self.weight.device)
        self.weight_prequantized = bool(structure["weight_prequantized"])
        self._cache.invalidate()

    def prepare_input(self, x: Tensor) -> Tensor:
        """The input as the matmul sees it: through the input transform, then quantized when
        quantization is on (what calibration statistics such as GPTQ's Hessian must see)."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.quant_enabled and self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare_input(x)
        if not self.quant_enabled:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.quantized_weight(), self.bias)
        if self.training and self.grad_quantizer is not None and y.requires_grad:
            y = QuantizeGrad.apply(y, self.grad_quantizer)
        return y
