"""What is trained and on which loss: causal-LM next-token loss, or Wan flow matching.

An objective exposes the module to train (`module`), what the quantizer wraps (`quant_target`: the
model, or the Wan pipeline), the number of training samples, `train_batch(indices, step, micro, rank)`,
`eval_batches(batch_size)` (a fixed held-out set, identical for every run) and `loss(model, batch)`.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lpq.models.hub import LoadedModel
from lpq.train.recipe import DataKind, TrainRecipe


class CausalLMObjective:
    def __init__(self, loaded: LoadedModel, recipe: TrainRecipe):
        from lpq.train.data import text_splits

        if loaded.tokenizer is None:
            raise ValueError(f"model {loaded.name!r} came without a tokenizer")
        self.module: nn.Module = loaded.model
        self.quant_target = loaded.model
        self.splits = text_splits(recipe.data, loaded.tokenizer)

    @property
    def num_train(self) -> int:
        return len(self.splits.train)

    def train_batch(self, indices: list[int], step: int, micro: int, rank: int) -> dict:
        return {"input_ids": self.splits.train[indices]}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for start in range(0, len(self.splits.eval), batch_size):
            yield {"input_ids": self.splits.eval[start:start + batch_size]}

    @staticmethod
    def loss(model: nn.Module, batch: dict) -> Tensor:
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids, use_cache=False).loss


def build_objective(loaded: LoadedModel, recipe: TrainRecipe):
    kind = recipe.data.kind
    if loaded.kind == "causal_lm":
        if kind is not DataKind.TEXT:
            raise ValueError(f"model {loaded.name!r} is a causal LM; it trains on data.kind 'text', not {kind.value!r}")
        return CausalLMObjective(loaded, recipe)
    if kind is not DataKind.WAN_LATENTS:
        raise ValueError(f"model {loaded.name!r} is a Wan pipeline; it trains on data.kind 'wan_latents' "
                         f"(run `lpq prepare-data` first), not {kind.value!r}")
    from lpq.train.latents import LatentCache
    from lpq.train.wan_objective import WanFlowObjective

    cache = LatentCache(recipe.data.cache_dir)
    n_eval = recipe.data.eval_blocks
    if len(cache) <= n_eval:
        raise ValueError(f"{recipe.data.cache_dir} holds {len(cache)} samples; need more than "
                         f"data.eval_blocks={n_eval} to keep some for training")
    idx = list(range(len(cache)))
    objective = WanFlowObjective(loaded.model, cache, idx[:-n_eval], idx[-n_eval:], recipe.train.flow,
                                 recipe.train.seed)
    # Training needs only the transformer: drop the text encoder and VAE (the cache replaces them).
    loaded.model.text_encoder = None
    loaded.model.vae = None
    return objective


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
