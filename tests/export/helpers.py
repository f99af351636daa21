"""Tiny quantized models and their reference outputs for the export tests."""
from __future__ import annotations

import torch

from lpq.config import from_dict
from lpq.quant import QuantRecipe, quantize_model


def recipe(data: dict) -> QuantRecipe:
    return from_dict(data, QuantRecipe)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def quantized_lm(name: str, data: dict, dtype: torch.dtype = torch.float32):
    from lpq.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(name, dtype)
    r = recipe(data)
    quantize_model(model, r)
    return model, r


@torch.no_grad()
def wan_forward(transformer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = next(transformer.parameters()).dtype
    latents = torch.randn(1, 16, 2, 8, 8, generator=g).to(dtype)
    text = torch.randn(1, 8, 32, generator=g).to(dtype)
    return transformer(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text,
                       return_dict=False)[0]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (torch.equal treats -0 == +0 and fails on NaN)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints)))
