"""InputTransform: the serializable online transform a QuantLinear applies to its input.

PTQ rewrites a linear y = x W^T as y = (x diag(1/s) H)(W diag(s) H)^T: the weight absorbs the
SmoothQuant scale s and the block Hadamard H offline, the input gets them online. This module is
that online part, kept as data (block size + scale buffer) so exports and state dicts carry it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lpq.algorithms.hadamard import block_sizes, fwht


class InputTransform(nn.Module):
    """x -> fwht(x / input_scale, hadamard_block), either step optional.

    The Hadamard is block-diagonal and normalized along the last dim, exactly `lpq.algorithms.
    hadamard.fwht` (a last dim that is not a multiple of the block ends in smaller power-of-two
    blocks). `input_scale` is a buffer (in the state dict) broadcast against x and cast to x's dtype
    before the division, as the PTQ simulation does.
    """

    def __init__(self, hadamard_block: int | None = None, input_scale: Tensor | None = None):
        super().__init__()
        if hadamard_block is not None:
            block_sizes(hadamard_block, hadamard_block)      # raises unless a power of two
        if hadamard_block is None and input_scale is None:
            raise ValueError("InputTransform needs a hadamard_block, an input_scale, or both")
        self.hadamard_block = hadamard_block
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())

    def extra_repr(self) -> str:
        scale = None if self.input_scale is None else tuple(self.input_scale.shape)
        return f"hadamard_block={self.hadamard_block}, input_scale={scale}"

    def structure(self) -> dict:
        """Constructor arguments as data (the scale's values are in the state dict)."""
        scale = None if self.input_scale is None else list(self.input_scale.shape)
        return {"hadamard_block": self.hadamard_block, "input_scale": scale}

    @classmethod
    def from_structure(cls, structure: dict) -> InputTransform:
        """An InputTransform of that shape; its scale is zeros until a state dict is loaded into it."""
        shape = structure["input_scale"]
        return cls(structure["hadamard_block"], None if shape is None else torch.zeros(shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.hadamard_block is not None:
            x = fwht(x, self.hadamard_block)
        return x
