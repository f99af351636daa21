"""Whole-residual-stream orthogonal rotation (QuaRot-style) of a Llama-family causal LM, offline.

With an orthogonal R (hidden x hidden), the residual stream h is replaced by h R everywhere:
embeddings produce h R, every linear reading the stream reads it through R^T (W <- W R), every
linear writing it writes through R (W <- R^T W). RMSNorm commutes with R once its weight is folded
into the linears it feeds (||h R|| = ||h||, and no mean is subtracted), so the model's function is
unchanged in exact arithmetic while the inputs of q/k/v/gate/up and the lm_head become incoherent:
an outlier channel is spread over all channels, which is what 4-bit activations need.

Tied input/output embeddings are untied (the embedding is rotated on its output side, the lm_head
on its input side, after absorbing the final norm).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Linears reading the residual stream after each norm, and linears writing it, per block.
_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded Haar-random orthogonal (n, n) matrix in float64 (QR of a Gaussian, signs fixed)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _check_supported(model: nn.Module) -> None:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model.model, "embed_tokens") or not hasattr(model.model, "norm"):
        raise ValueError(f"rotate_residual supports Llama-family causal LMs (model.layers, embed_tokens, norm); "
                         f"got {type(model).__name__}")
    names = {n for n, _ in layers[0].named_modules()}
    missing = [n for n in (*_READERS, *(r for rs in _READERS.values() for r in rs), *_WRITERS) if n not in names]
    if missing:
        raise ValueError(f"rotate_residual: {type(layers[0]).__name__} has no {', '.join(missing)} "
                         "(fused MoE experts and other block layouts are not supported)")


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """Linears after an RMSNorm absorb its weight (W <- W diag(g)); the norm's weight becomes 1."""
    if getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__} has a bias; rotate_residual needs RMSNorm (no mean, no bias)")
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _rotate_input(lin: nn.Linear, R: Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ R).to(lin.weight.dtype))


def _rotate_output(lin: nn.Linear, R: Tensor) -> None:
    lin.weight.copy_((R.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ R).to(lin.bias.dtype))


@torch.no_grad()
def rotate_residual(model: nn.Module, seed: int = 0) -> Tensor:
    """Rotate the residual stream of `model` in place (function preserved); returns R (float64)."""
    _check_supported(model)
    inner = model.model
    hidden = inner.embed_tokens.weight.shape[1]
    R = random_orthogonal(hidden, seed)
    head = model.get_output_embeddings()
    if head.weight is inner.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    emb = inner.embed_tokens.weight
    emb.copy_((emb.double() @ R).to(emb.dtype))
    for block in inner.layers:
        for norm_name, readers in _READERS.items():
            lins = [block.get_submodule(r) for r in readers]
            _fold_norm(block.get_submodule(norm_name), lins)
            for lin in lins:
                _rotate_input(lin, R)
        for w in _WRITERS:
            _rotate_output(block.get_submodule(w), R)
    _fold_norm(inner.norm, [head])
    _rotate_input(head, R)
    return R
