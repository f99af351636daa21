"""Whole-residual-stream orthogonal rotation (QuaRot-style) of a causal LM, offline.

With an orthogonal R (hidden x hidden), the residual stream h is replaced by h R everywhere:
embeddings produce h R, every linear reading the stream reads it through R^T (W <- W R), every
linear writing it writes through R (W <- R^T W). RMSNorm commutes with R once its weight is folded
into the linears it feeds (||h R|| = ||h||, and no mean is subtracted), so the model's function is
unchanged in exact arithmetic while the inputs of q/k/v/gate/up and the lm_head become incoherent:
an outlier channel is spread over all channels, which is what 4-bit activations need.

Tied input/output embeddings are untied (the embedding is rotated on its output side, the lm_head
on its input side, after absorbing the final norm). Which norms feed which linears and which linears
write the stream is the family adapter's `residual` map (lpq/models/adapters.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lpq.algorithms.step import Phase, Step, register
from lpq.models.adapters import Adapter, get_adapter


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded Haar-random orthogonal (n, n) matrix in float64 (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _check_supported(model: nn.Module, adapter: Adapter) -> None:
    if adapter.residual is None or adapter.final_norm is None:
        raise ValueError(f"rotate_residual: the {adapter.family} family has no residual-stream map (e.g. fused MoE "
                         f"experts read the stream through 3-D weights); add `residual` to its adapter")
    names = {n for n, _ in model.named_modules()}
    missing = [n for n in (adapter.residual.embedding, adapter.final_norm) if n not in names]
    block_names = {n for n, _ in adapter.blocks(model)[0].named_modules()}
    r = adapter.residual
    missing += [n for n in (*(nm for nm, _ in r.readers), *(x for _, xs in r.readers for x in xs), *r.writers)
                if n not in block_names]
    if missing:
        raise ValueError(f"rotate_residual: {type(model).__name__} has no {', '.join(missing)} "
                         f"(its blocks do not match the {adapter.family} adapter's residual map)")


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Linears after an RMSNorm absorb its weight (W <- W diag(g)); the norm's weight becomes 1."""
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} has a bias; rotate_residual needs RMSNorm (no mean, no bias)")
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _rotate_input(lin: nn.Module, R: Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ R).to(lin.weight.dtype))


def _rotate_output(lin: nn.Module, R: Tensor) -> None:
    lin.weight.copy_((R.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ R).to(lin.bias.dtype))


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0, adapter: Adapter | None = None) -> Tensor:
    """Rotate the residual stream of `model` in place (function preserved); returns R (float64)."""
    adapter = adapter or get_adapter(model)
    _check_supported(model, adapter)
    r = adapter.residual
    embedding = model.get_submodule(r.embedding)
    hidden = embedding.weight.shape[1]
    R = random_orthogonal(hidden, seed)
    head = model.get_output_embeddings()
    if head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    emb = embedding.weight
    emb.copy_((emb.double() @ R).to(emb.dtype))
    for block in adapter.blocks(model):
        for norm_name, readers in r.readers:
            lins = [block.get_submodule(x) for x in readers]
            _fold_norm(block.get_submodule(norm_name), lins)
            for lin in lins:
                _rotate_input(lin, R)
        for w in r.writers:
            _rotate_output(block.get_submodule(w), R)
    _fold_norm(model.get_submodule(adapter.final_norm), [head])
    _rotate_input(head, R)
    return R


@dataclass
class RotateResidualSettings:
    seed: int = 0                  # seed of the random orthogonal matrix


@register
class RotateResidual(Step):
    name = "rotate_residual"
    Settings = RotateResidualSettings
    phase = Phase.MODEL

    def check(self, run) -> None:
        run.require_whole_model("rotate_residual rewrites every weight of the model at once")
        _check_supported(run.loaded.model, run.adapter)

    def on_model_start(self, run) -> None:
        # Data-free and seeded: a resumed run rebuilds the same rotated model, then loads its finished blocks.
        rotate_residual(run.loaded.model, self.settings.seed, run.adapter)
