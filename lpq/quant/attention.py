"""Attention quantization: Q, K, V and the softmax probabilities P, each with its own scaling state.

The quantizers live in an `AttentionQuantizers` module attached to each attention module as
`lpq_attention` (so checkpoints carry their buffers). Two entry points reach them:

* transformers: an attention function registered through `AttentionInterface` under
  `lpq_quant_<original>` (with the original's mask function), selected with
  `model.set_attn_implementation`;
* diffusers Wan: `QuantWanAttnProcessor`, set on each `WanAttention`.

With quantization disabled both call the original implementation, so outputs are unchanged bit
for bit. Enabled, attention is computed explicitly, by one of these paths (`AttentionQuantizers.impl`):

* `tiled` (lpq.quant.tiled_attention): scores recomputed in block_q x block_k tiles, memory
  independent of query length x key length, custom backward;
* `fused` (opt-in): the tiled computation in Triton kernels (lpq.kernels.attention; CUDA, or CPU
  under TRITON_INTERPRET=1), P in HiF8 or unquantized;
* `materialized` (lpq.quant.materialized_attention): the plain reference, P held in memory (memory
  grows with query x key length), in chunks of `causal_rows` query rows where the call is causal.

`auto` (the default) takes the tiled path when the scores of a call span more than one tile and
the tiled path computes it exactly as the materialized one (no dropout on P, P's format and axis
local to key tiles: see tiled_attention.unsupported_reason); otherwise the materialized path, which
is then the same computation at no extra memory (one tile) or the only one that supports it.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lpq.algorithms.hadamard import fwht
from lpq.quant.materialized_attention import DEFAULT_CAUSAL_ROWS, materialized_attention
from lpq.quant.quantizer import TensorQuantizer
from lpq.quant.recipe import AttentionRecipe, QKRotation
from lpq.quant.tiled_attention import (DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, fused_quantized_attention,
                                       fused_unsupported_reason, tiled_quantized_attention, unsupported_reason)

ROLES = ("q", "k", "v", "p")
IMPLS = ("auto", "tiled", "fused", "materialized")


class AttentionQuantizers(nn.Module):
    def __init__(self, recipe: AttentionRecipe):
        super().__init__()
        for role in ROLES:
            spec = getattr(recipe, role)
            setattr(self, f"{role}_quantizer", TensorQuantizer(spec, role) if spec else None)
        self.qk_rotation = recipe.qk_rotation
        self.quant_enabled = True
        self.impl = "auto"                 # see the module docstring
        self.block_q = DEFAULT_BLOCK_Q     # tile of the tiled path: query rows x keys
        self.block_k = DEFAULT_BLOCK_K
        self.causal_rows = DEFAULT_CAUSAL_ROWS   # query rows per chunk of the materialized causal path

    def extra_repr(self) -> str:
        return f"quant_enabled={self.quant_enabled}, impl={self.impl}, qk_rotation={self.qk_rotation}"

    def quantize(self, role: str, x: Tensor) -> Tensor:
        q = getattr(self, f"{role}_quantizer")
        return q(x) if q is not None else x


def rotate_heads(x: Tensor) -> Tensor:
    """x H along head_dim, H the normalized Sylvester Hadamard (blocks of powers of two where head_dim is
    not one): symmetric and orthogonal, so rotating Q and K alike leaves Q K^T as it was."""
    d = x.shape[-1]
    return fwht(x, 1 << (d.bit_length() - 1))


def quantized_attention(aq: AttentionQuantizers, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                        scaling: float, causal: bool, dropout: float = 0.0, training: bool = False) -> Tensor:
    """softmax(Q K^T * scaling + mask) V with Q, K, V, P quantized (Q and K first rotated per head where
    `aq.qk_rotation` says so). Shapes (B, H, S, D); K and V may have fewer heads (grouped-query
    attention); mask: bool (True = visible) or additive, broadcastable to (B, H, Sq, Skv). Returns
    (B, H, Sq, D). The path follows `aq.impl` (module docstring)."""
    if aq.impl not in IMPLS:
        raise ValueError(f"AttentionQuantizers.impl is {aq.impl!r}; valid: {', '.join(IMPLS)}")
    why = unsupported_reason(aq.p_quantizer, dropout if training else 0.0)
    if aq.impl in ("tiled", "fused") and why is not None:
        raise NotImplementedError(f"{aq.impl} quantized attention: {why}; use impl='materialized' or 'auto'")
    if aq.qk_rotation == QKRotation.HADAMARD:
        query, key = rotate_heads(query), rotate_heads(key)
    q = aq.quantize("q", query)
    k = aq.quantize("k", key)
    v = aq.quantize("v", value)
    sq, skv = q.shape[-2], k.shape[-2]
    tiled = aq.impl == "tiled" or (aq.impl == "auto" and why is None
                                   and (sq > aq.block_q or skv > aq.block_k))
    if not tiled and aq.impl != "fused":
        return materialized_attention(q, k, v, mask, scaling, causal, aq.p_quantizer, dropout, training,
                                      aq.causal_rows)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if aq.impl == "fused":
        return fused_quantized_attention(q, k, v, mask, scaling, causal, aq.p_quantizer)
    return tiled_quantized_attention(q, k, v, mask, scaling, causal, aq.p_quantizer, aq.block_q, aq.block_k)


# ---------------------------------------------------------------- transformers

def _original_function(module: nn.Module, original: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}'s module has no eager_attention_forward; load the model "
                               f"with attn_implementation='sdpa' before quantizing attention")
        return fn
    return ALL_ATTENTION_FUNCTIONS[original]


def attention_name(original: str) -> str:
    return f"lpq_quant_{original}"


def register_transformers_attention(original: str) -> str:
    """Register `lpq_quant_<original>` (attention and mask functions); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if original.startswith("lpq_quant_"):
        raise RuntimeError("the model's attention is already quantized by lpq")
    if original not in ("eager", "sdpa"):
        raise NotImplementedError(f"attention quantization wraps 'eager' or 'sdpa' attention, not {original!r}; "
                                  f"load the model with attn_implementation='sdpa'")
    name = attention_name(original)

    def lpq_quant_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[Tensor, None]:
        aq = getattr(module, "lpq_attention", None)
        if aq is None or not aq.quant_enabled:
            return _original_function(module, original)(module, query, key, value, attention_mask, dropout=dropout,
                                                         scaling=scaling, is_causal=is_causal, **kwargs)
        # A sliding window is already in the mask; soft-capping and attention sinks are not handled.
        for unsupported in ("softcap", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(f"quantized attention does not support {unsupported}")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = quantized_attention(aq, query, key, value, attention_mask,
                                  scaling if scaling is not None else query.shape[-1] ** -0.5, causal,
                                  dropout=dropout, training=module.training)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, lpq_quant_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


# ---------------------------------------------------------------- diffusers Wan

def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Wan's rotary embedding rotates interleaved (even, odd) pairs of each head's channels.
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


class QuantWanAttnProcessor:
    """Wan attention processor with quantized Q/K/V/P; delegates to `original` when disabled."""

    TEXT_CONTEXT = 512   # Wan's text context length; longer encoder states carry image tokens first (I2V)

    def __init__(self, original: Any):
        self.original = original

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None,
                 **kwargs: Any) -> Tensor:
        aq = getattr(attn, "lpq_attention", None)
        if aq is None or not aq.quant_enabled:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("quantized Wan attention needs unfused projections (call unfuse_projections())")
        image_states = None
        if attn.add_k_proj is not None:
            n_img = encoder_hidden_states.shape[1] - self.TEXT_CONTEXT
            image_states, encoder_hidden_states = encoder_hidden_states[:, :n_img], encoder_hidden_states[:, n_img:]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(2, (heads, -1))
        v = attn.to_v(context).unflatten(2, (heads, -1))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q = q.transpose(1, 2)
        scaling = q.shape[-1] ** -0.5
        out = quantized_attention(aq, q, k.transpose(1, 2), v.transpose(1, 2), attention_mask, scaling, False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        if image_states is not None:
            k_img = attn.norm_added_k(attn.add_k_proj(image_states)).unflatten(2, (heads, -1)).transpose(1, 2)
            v_img = attn.add_v_proj(image_states).unflatten(2, (heads, -1)).transpose(1, 2)
            out = out + quantized_attention(aq, q, k_img, v_img, None, scaling, False).transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))
