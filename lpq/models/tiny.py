"""Tiny random models built from config: the real transformers/diffusers classes at toy sizes.

They exercise every code path (dense, fused MoE experts, Pangu-shaped bias attention, Wan2.1 and
the two-expert Wan2.2 pipeline) in well under a second, with no download. Seeded, so reproducible.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:   # torch is imported where a model is built: naming the built-ins stays cheap
    import torch

# The tiny built-ins and their kind; lpq.models.hub lists these after its own smollm2-135m.
TINY_MODELS = {"tiny-llama": "causal_lm", "tiny-qwen3": "causal_lm", "tiny-qwen3-moe": "causal_lm",
               "tiny-pangu": "causal_lm", "tiny-wan21": "wan", "tiny-wan22": "wan"}

_LLM_COMMON = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
TINY_CONTEXT = _LLM_COMMON["max_position_embeddings"]
_WAN_LAYERS = 2


class TinyModel(NamedTuple):
    kind: str                 # "causal_lm" or "wan"
    model: Any                # the model, or for Wan the pipeline
    tokenizer: Any = None


def tiny_blocks(name: str) -> dict[str, int]:
    """Blocks per network of a tiny built-in, from the configs below (nothing is built)."""
    if name == "tiny-wan21":
        return {"transformer": _WAN_LAYERS}
    if name == "tiny-wan22":
        return {"transformer": _WAN_LAYERS, "transformer_2": _WAN_LAYERS}
    if name in TINY_MODELS:
        return {"": _LLM_COMMON["num_hidden_layers"]}
    raise ValueError(f"unknown tiny built-in {name!r}; tiny built-ins: {', '.join(TINY_MODELS)}")


def _word_tokenizer(vocab_size: int):
    """A word-level tokenizer built in code (no files), for the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_causal_lm(name: str, dtype: torch.dtype | None = None, seed: int = 0):
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    if name == "tiny-llama":
        model = LlamaForCausalLM(LlamaConfig(**_LLM_COMMON))
    elif name == "tiny-pangu":
        # openPangu-Embedded is Llama-shaped with biased q/k/v/o projections.
        model = LlamaForCausalLM(LlamaConfig(**_LLM_COMMON, attention_bias=True))
    elif name == "tiny-qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_LLM_COMMON))
    elif name == "tiny-qwen3-moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**_LLM_COMMON, moe_intermediate_size=32, num_experts=4,
                                                   num_experts_per_tok=2))
    else:
        raise ValueError(f"unknown tiny causal LM {name!r}")
    return model.to(dtype or torch.float32).eval()


def tiny_wan_transformer(in_channels: int = 16, seed: int = 0):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=in_channels, text_dim=32, freq_dim=256,
                                 ffn_dim=32, num_layers=_WAN_LAYERS, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_wan_pipeline(two_experts: bool, dtype: torch.dtype | None = None, seed: int = 0):
    """Wan2.1 (one transformer) or Wan2.2 (high-noise `transformer` + low-noise `transformer_2`)."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=_word_tokenizer(32), text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=tiny_wan_transformer(seed=seed + 1),
                       transformer_2=tiny_wan_transformer(seed=seed + 2) if two_experts else None,
                       boundary_ratio=0.875 if two_experts else None)
    # .to() on a float32 pipeline is a no-op that only warns about Wan's float32-pinned modules.
    return pipe if dtype in (None, torch.float32) else pipe.to(dtype=dtype)


def build_tiny(name: str, dtype: torch.dtype | None = None) -> TinyModel:
    """A tiny built-in by name (float32 unless `dtype`)."""
    kind = TINY_MODELS.get(name)
    if kind == "wan":
        return TinyModel(kind, tiny_wan_pipeline(name == "tiny-wan22", dtype))
    if kind == "causal_lm":
        return TinyModel(kind, tiny_causal_lm(name, dtype), _word_tokenizer(_LLM_COMMON["vocab_size"]))
    raise ValueError(f"unknown tiny built-in {name!r}; tiny built-ins: {', '.join(TINY_MODELS)}")
