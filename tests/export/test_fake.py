"""Fake exports load with stock transformers / diffusers, nothing of lpq in them."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lpq.export import CheckpointError, export_model, load_quantized
from lpq.quant import quantize_model
from tests.export.helpers import logits, quantized_lm, recipe, same_bits, tokens, wan_forward


def test_fake_llama_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Weight-only recipe: the stock model then computes exactly what the quantized one does. (float32:
    # the bf16 tiny model has its rotary table cast to bf16, which from_pretrained keeps in float32.)
    model, r = quantized_lm("tiny-llama", {"weight": {"format": "hif4"}})
    ids = tokens()
    expected = logits(model, ids)
    report = export_model(model, r, tmp_path / "fake", kind="fake", tokenizer=_tokenizer())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")

    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert same_bits(logits(plain, ids), expected)
    assert "quantization_config" not in json.loads((tmp_path / "fake" / "config.json").read_text())
    with safe_open(str(tmp_path / "fake" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "quantizer" in k]
    assert AutoTokenizer.from_pretrained(tmp_path / "fake").convert_tokens_to_ids("w5") == 9
    assert report.kind == "fake" and report.bits_per_param == 32.0         # float32 values
    assert "run unquantized" in (tmp_path / "fake" / "README.md").read_text()
    with pytest.raises(CheckpointError, match="fake-quantized export"):
        load_quantized(tmp_path / "fake")


def test_fake_qwen3_moe_has_the_quantized_expert_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model, r = quantized_lm("tiny-qwen3-moe", {"format": "mxfp4"}, torch.bfloat16)
    export_model(model, r, tmp_path / "fake", kind="fake")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    assert plain.dtype == torch.bfloat16
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        assert same_bits(plain.model.layers[0].mlp.experts.gate_up_proj, experts.quantized_weight("gate_up_proj"))
        assert same_bits(plain.model.layers[1].mlp.experts.down_proj,
                         model.model.layers[1].mlp.experts.quantized_weight("down_proj"))


def test_fake_wan22_loads_with_plain_diffusers(tmp_path):
    from diffusers import WanPipeline

    from lpq.models.tiny import tiny_wan_pipeline
    from lpq.quant import quant_enabled

    pipe = tiny_wan_pipeline(two_experts=True)
    r = recipe({"weight": {"format": "hif8"}})
    quantize_model(pipe, r)
    export_model(pipe, r, tmp_path / "fake", kind="fake")
    plain = WanPipeline.from_pretrained(tmp_path / "fake")
    for n in ("transformer", "transformer_2"):
        ours, stock = getattr(pipe, n), getattr(plain, n)
        with torch.no_grad():
            for name in ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2"):
                assert same_bits(stock.get_submodule(name).weight, ours.get_submodule(name).quantized_weight())
        # Not bit for bit: from_pretrained memory-maps weights, and unaligned float32 data takes other
        # SIMD paths in some kernels (seen as ~1e-7 differences even between two stock copies).
        torch.testing.assert_close(wan_forward(stock), wan_forward(ours), rtol=1e-5, atol=1e-5)
    with quant_enabled(pipe, False):       # and the stored weights are not the original ones
        assert not torch.allclose(wan_forward(plain.transformer), wan_forward(pipe.transformer), atol=1e-5)


def _tokenizer():
    from lpq.models.tiny import _word_tokenizer

    return _word_tokenizer(1000)
