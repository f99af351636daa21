"""Wan flow-matching objective on cached latents, as in Wan's own training and diffusers' schedulers.

A noise level s in (0, 1) is drawn, warped by the scheduler's shift, s' = k s / (1 + (k - 1) s); the model
sees x_t = (1 - s') x0 + s' noise at timestep t = 1000 s' and is trained to predict the velocity noise - x0.
For Wan2.2 each expert owns a timestep range (boundary_ratio * 1000 splits them); only that range is drawn.
Noise and levels come from a generator seeded by (seed, step, micro-batch, rank), so a resumed run
draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpq.train.data import seeded_generator
from lpq.train.latents import LatentCache
from lpq.train.recipe import FlowMatchConfig, TimestepSampling


def scheduler_shift(scheduler) -> float:
    """The shift the pipeline samples with (FlowMatchEuler: `shift`; UniPC/DPM flow: `flow_shift`)."""
    cfg = scheduler.config
    for key in ("shift", "flow_shift"):
        if cfg.get(key) is not None:
            return float(cfg[key])
    return 1.0


def shift_sigma(u: Tensor, shift: float) -> Tensor:
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


def sigma_range(expert: str, boundary_ratio: float | None) -> tuple[float, float]:
    """Shifted noise levels an expert is trained on: Wan2.1 all, Wan2.2 high noise above the boundary."""
    if boundary_ratio is None:
        if expert != "transformer":
            raise ValueError("train.flow.expert 'transformer_2' needs a two-expert (Wan2.2) pipeline")
        return 0.0, 1.0
    return (boundary_ratio, 1.0) if expert == "transformer" else (0.0, boundary_ratio)


def sample_sigmas(n: int, gen: torch.Generator, cfg: FlowMatchConfig, shift: float,
                  lo: float, hi: float) -> Tensor:
    """n shifted noise levels in [lo, hi): base levels drawn in the matching unshifted interval."""
    ulo, uhi = unshift_sigma(lo, shift), unshift_sigma(hi, shift)
    if cfg.timestep_sampling is TimestepSampling.LOGIT_NORMAL:
        u = torch.sigmoid(torch.randn(n, generator=gen))
    else:
        u = torch.rand(n, generator=gen)
    return shift_sigma(ulo + (uhi - ulo) * u, shift)


class WanFlowObjective:
    """Trains one Wan transformer (the `expert`) on a `LatentCache`."""

    def __init__(self, pipe, cache: LatentCache, train_idx: list[int], eval_idx: list[int],
                 cfg: FlowMatchConfig, seed: int):
        if pipe.config.get("expand_timesteps"):
            raise ValueError("Wan2.2 TI2V (expand_timesteps=True) per-token timesteps are not supported by lpq train")
        self.module: nn.Module = getattr(pipe, cfg.expert)
        if self.module is None:
            raise ValueError(f"the pipeline has no {cfg.expert}")
        self.quant_target = self.module
        self.cache, self.train_idx, self.eval_idx = cache, train_idx, eval_idx
        self.cfg, self.seed = cfg, seed
        self.shift = cfg.shift if cfg.shift is not None else scheduler_shift(pipe.scheduler)
        self.lo, self.hi = sigma_range(cfg.expert, pipe.config.get("boundary_ratio"))
        self.num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    @property
    def num_train(self) -> int:
        return len(self.train_idx)

    def _noised(self, x0: Tensor, sigma: Tensor, gen: torch.Generator) -> dict:
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        return {"noisy": (1 - s) * x0 + s * noise, "timestep": sigma * self.num_train_timesteps,
                "target": noise - x0}

    def train_batch(self, indices: list[int], step: int, micro: int, rank: int) -> dict:
        x0, emb = self.cache.batch([self.train_idx[i] for i in indices])
        gen = seeded_generator(self.seed, step, micro, rank)
        sigma = sample_sigmas(len(indices), gen, self.cfg, self.shift, self.lo, self.hi)
        return {**self._noised(x0, sigma, gen), "embeds": emb}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """Every held-out sample at `eval_timesteps` evenly spaced levels, with fixed noise."""
        k = self.cfg.eval_timesteps
        u = torch.arange(k, dtype=torch.float32).add(0.5).div(k)
        ulo, uhi = unshift_sigma(self.lo, self.shift), unshift_sigma(self.hi, self.shift)
        levels = shift_sigma(ulo + (uhi - ulo) * u, self.shift)
        pairs = [(i, lv) for i in self.eval_idx for lv in levels]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            x0, emb = self.cache.batch([i for i, _ in chunk])
            gen = seeded_generator(self.seed, -1, start)   # step -1: the eval stream
            yield {**self._noised(x0, torch.stack([lv for _, lv in chunk]), gen), "embeds": emb}

    @staticmethod
    def loss(model: nn.Module, batch: dict) -> Tensor:
        dtype = next(model.parameters()).dtype
        pred = model(hidden_states=batch["noisy"].to(dtype), timestep=batch["timestep"],
                     encoder_hidden_states=batch["embeds"].to(dtype), return_dict=False)[0]
        return F.mse_loss(pred.float(), batch["target"].float())
