"""Tiny models and inputs shared by the runtime tests, plus a recorder of the weights used in forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lpq.models.tiny import tiny_causal_lm, tiny_wan_pipeline, tiny_wan_transformer

LLMS = ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-pangu"]
MODELS = LLMS + ["tiny-wan21", "tiny-wan22"]


def build(name: str):
    """(model, adapter family override or None). Wan2.1 is a bare transformer, Wan2.2 a pipeline."""
    if name == "tiny-wan21":
        return tiny_wan_transformer(), None
    if name == "tiny-wan22":
        return tiny_wan_pipeline(two_experts=True), None
    return tiny_causal_lm(name), "pangu" if name == "tiny-pangu" else None


def networks(model) -> list:
    if isinstance(model, torch.nn.Module):
        return [model]
    return [model.transformer, model.transformer_2]


def run(net, seed: int = 0) -> torch.Tensor:
    """One forward of a causal LM (with a padded row) or a Wan transformer."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(net, "blocks"):
        return net(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                   encoder_hidden_states=torch.randn(1, 8, 32, generator=g), return_dict=False)[0]
    ids = torch.randint(4, 1000, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    return net(input_ids=ids, attention_mask=mask).logits


class LinearWeights(TorchFunctionMode):
    """Records every weight passed to F.linear."""

    def __init__(self):
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.weights.append((args[1] if len(args) > 1 else kwargs["weight"]).detach())
        return func(*args, **kwargs)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
