"""Model support as data: where each family's transformer blocks are and what is in them.

An adapter names, relative to each block, the linears to quantize, the fused-experts modules and
the attention modules, plus the modules left in high precision by default, which producer (a norm
or a linear) feeds which linears (where SmoothQuant folds its scales) and which weights a rotation
of the residual stream touches. What differs between kinds of model (how calibration inputs reach
the blocks, the loss that ranks blocks, the evaluation) is in lpq/models/kinds.py, picked by `kind`.
To support a new architecture, add an `Adapter(...)` to ADAPTERS with its `model_types`
(transformers' `config.model_type`) and block layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from lpq.models.kinds import ModelKind


@dataclass(frozen=True)
class ResidualMap:
    """What a rotation of the residual stream h -> h R touches (names relative to the model, or to a block)."""

    embedding: str                                   # module whose weight rows produce h
    readers: tuple[tuple[str, tuple[str, ...]], ...]  # per block: (norm, linears reading the stream after it)
    writers: tuple[str, ...]                          # per block: linears adding into the stream


@dataclass(frozen=True)
class Adapter:
    family: str
    kind: str                          # "causal_lm" (transformers) or "wan" (diffusers): see kinds.py
    model_types: tuple[str, ...]       # config.model_type values (causal LMs) or class names (Wan)
    blocks_path: str                   # dotted path of the ModuleList of transformer blocks
    linears: tuple[str, ...]           # per-block linears (a block may lack some, e.g. MoE vs dense layers)
    experts: tuple[str, ...] = ()      # per-block fused-experts modules (3-D expert weights)
    attention: tuple[str, ...] = ()    # per-block attention modules
    exclude: tuple[str, ...] = ()      # modules kept in high precision by default (fnmatch patterns)
    # Per block: (linears sharing one input, the module producing that input): a norm, or a linear
    # whose output rows can absorb a per-channel scale. Groups not listed get an online scale.
    folds: tuple[tuple[tuple[str, ...], str], ...] = ()
    final_norm: str | None = None      # the norm before the output head (causal LMs)
    residual: ResidualMap | None = None   # None: residual rotation not supported
    # Config flags that give per-block linears a bias in the model class (transformers builds them when
    # the flag is true): where learned output biases can live in a checkpoint any loader reads.
    bias_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def model_kind(self) -> ModelKind:
        from lpq.models.kinds import KINDS

        return KINDS[self.kind]

    def networks(self, model: object) -> list[tuple[str, nn.Module]]:
        """The quantizable networks: [("", model)], or a Wan pipeline's transformers by attribute name."""
        return self.model_kind.networks(model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The ordered transformer blocks of one network (for a Wan pipeline, call it per transformer)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(model).__name__} holds several networks; call blocks() on each of "
                            f"adapter.networks(pipeline)")
        try:
            blocks = model.get_submodule(self.blocks_path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no '{self.blocks_path}' block list; it does not look like a "
                             f"{self.family} model") from None
        return list(blocks)

    def block_prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def block_members(self, block: nn.Module) -> dict[str, list[str]]:
        """Which of the adapter's per-block names this block has: {"linear": [...], "experts": [...], ...}."""
        present = dict(block.named_modules())
        return {kind: [n for n in names if n in present]
                for kind, names in (("linear", self.linears), ("experts", self.experts), ("attention", self.attention))}


_LLM_EXCLUDE = ("model.embed_tokens", "lm_head", "*norm*", "model.rotary_emb")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LINEARS = _QKV + ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_FOLDS = ((_QKV, "input_layernorm"), (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
                (("mlp.down_proj",), "mlp.up_proj"))
_LLAMA_RESIDUAL = ResidualMap("model.embed_tokens",
                              readers=(("input_layernorm", _QKV),
                                       ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
                              writers=("self_attn.o_proj", "mlp.down_proj"))
_ATTENTION_BIAS = ("attention_bias", _QKV + ("self_attn.o_proj",))
_LLAMA_LIKE = dict(attention=("self_attn",), exclude=_LLM_EXCLUDE, folds=_LLAMA_FOLDS, final_norm="model.norm",
                   residual=_LLAMA_RESIDUAL)

ADAPTERS: dict[str, Adapter] = {a.family: a for a in [
    Adapter("llama", "causal_lm", ("llama",), "model.layers", _LLAMA_LINEARS, **_LLAMA_LIKE,
            bias_flags=(_ATTENTION_BIAS, ("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))),
    # Qwen3's q/k RMSNorms act per head after q_proj/k_proj: the residual stream is Llama's. Its MLP
    # linears have no bias in transformers' Qwen3 classes.
    Adapter("qwen3", "causal_lm", ("qwen3",), "model.layers", _LLAMA_LINEARS, **_LLAMA_LIKE,
            bias_flags=(_ATTENTION_BIAS,)),
    # Sparse layers have fused experts and a router (`mlp.gate`, kept in high precision); layers
    # listed in config.mlp_only_layers are dense. The fused experts read and write the residual
    # stream through 3-D weights, which the residual rotation does not handle.
    Adapter("qwen3_moe", "causal_lm", ("qwen3_moe",), "model.layers", _LLAMA_LINEARS,
            experts=("mlp.experts",), attention=("self_attn",), exclude=_LLM_EXCLUDE + ("*.mlp.gate",),
            folds=_LLAMA_FOLDS, final_norm="model.norm", bias_flags=(_ATTENTION_BIAS,)),
    # openPangu-Embedded (remote code, trust_remote_code=True): Llama layout with biased q/k/v/o.
    Adapter("pangu", "causal_lm", ("PanguEmbedded", "openpangu_dense"), "model.layers", _LLAMA_LINEARS,
            **_LLAMA_LIKE),
    Adapter("wan", "wan", ("WanTransformer3DModel",), "blocks",
            ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "attn2.add_k_proj", "attn2.add_v_proj",
             "ffn.net.0.proj", "ffn.net.2"),
            attention=("attn1", "attn2"),
            exclude=("patch_embedding", "condition_embedder*", "proj_out", "*norm*", "rope")),
]}


def _unsupported(what: str) -> ValueError:
    return ValueError(f"no lpq adapter for {what}. Supported families: {', '.join(ADAPTERS)}. To add one, append an "
                      f"Adapter(family, kind, model_types, blocks_path, linears, ...) to ADAPTERS in "
                      f"lpq/models/adapters.py (or pass adapter=<family> in the recipe if the layout matches one)")


def get_adapter(model: object, family: str | None = None) -> Adapter:
    """The adapter for a transformers causal LM, a WanTransformer3DModel or a Wan pipeline.

    `family` forces one (e.g. "pangu" for a Llama-shaped stand-in)."""
    if family is not None:
        if family not in ADAPTERS:
            raise _unsupported(f"family {family!r}")
        return ADAPTERS[family]
    transformer = getattr(model, "transformer", None)
    if not isinstance(model, nn.Module) and transformer is not None:
        model = transformer       # a diffusers pipeline: its transformers decide
    cls = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None) if isinstance(model, nn.Module) else None
    for adapter in ADAPTERS.values():
        if (adapter.kind == "wan" and cls in adapter.model_types) or \
                (adapter.kind == "causal_lm" and model_type in adapter.model_types):
            return adapter
    raise _unsupported(cls + (f" (model_type {model_type!r})" if model_type else ""))
