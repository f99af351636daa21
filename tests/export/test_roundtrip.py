"""Packed exports reload bit-exactly: tiny Llama (SmolLM2-shaped), Qwen3-MoE, Wan2.2; hif4, mxfp4, hif8."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lpq.export import export_model, load_quantized
from lpq.export.layout import BIT_ORDER_VERSION, SPEC_VERSION
from lpq.quant import AttentionQuantizers, QKRotation, QuantExperts, QuantLinear, quantize_model
from tests.export.helpers import logits, quantized_lm, recipe, same_bits, tokens, wan_forward

FORMATS = ["hif4", "mxfp4", "hif8"]
BITS = {"hif4": 4.5, "mxfp4": 4.25, "hif8": 8.0}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name, dtype", [("tiny-llama", torch.bfloat16), ("tiny-qwen3-moe", torch.float32)])
def test_causal_lm_round_trip(tmp_path, name, dtype, fmt):
    model, r = quantized_lm(name, {"format": fmt, "attention": {"format": "hif8"}, "protected_blocks": [1]}, dtype)
    ids = tokens()
    expected = logits(model, ids)
    out = tmp_path / "ckpt"
    report = export_model(model, r, out)
    loaded = load_quantized(out)

    assert same_bits(logits(loaded, ids), expected)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert not isinstance(loaded.model.layers[1].self_attn.q_proj, QuantLinear)    # protected block
    assert loaded.model.layers[0].self_attn.lpq_attention is not None
    if name == "tiny-qwen3-moe":
        assert isinstance(loaded.model.layers[0].mlp.experts, QuantExperts)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bit_order_version"], qc["format_spec_version"]) == ("lpq", BIT_ORDER_VERSION,
                                                                                      SPEC_VERSION)
    assert qc["recipe"]["protected_blocks"] == [1]
    with safe_open(str(out / "lpq_packed.safetensors"), "pt") as f:
        codes = f.get_tensor("model.layers.0.self_attn.q_proj.weight.codes")
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()
    assert codes.dtype == torch.uint8
    assert codes.shape == (64, 64 if fmt == "hif8" else 32)          # one byte per value, or two nibbles
    if name == "tiny-llama":       # every quantized dim is a multiple of 64: no padding
        assert report.bits_per_param == BITS[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_wan22_round_trip(tmp_path, fmt):
    from lpq.models.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(two_experts=True)
    r = recipe({"format": fmt, "attention": {"format": "hif8"}})
    quantize_model(pipe, r)
    expected = {n: wan_forward(getattr(pipe, n)) for n in ("transformer", "transformer_2")}
    export_model(pipe, r, tmp_path / "wan")
    loaded = load_quantized(tmp_path / "wan")

    assert type(loaded).__name__ == "WanPipeline" and loaded.config.boundary_ratio == 0.875
    for n in ("transformer", "transformer_2"):
        assert isinstance(getattr(loaded, n).blocks[0].attn1.to_q, QuantLinear)
        assert same_bits(wan_forward(getattr(loaded, n)), expected[n])


def test_wan22_pipeline_output_is_bit_exact(tmp_path):
    from lpq.models.tiny import tiny_wan_pipeline

    def frames(p):
        return p(prompt="w1 w2", height=16, width=16, num_frames=5, num_inference_steps=2, guidance_scale=5.0,
                 max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0)).frames

    pipe = tiny_wan_pipeline(two_experts=True)
    r = recipe({"format": "hif4"})
    quantize_model(pipe, r)
    expected = frames(pipe)
    export_model(pipe, r, tmp_path / "wan")
    assert same_bits(frames(load_quantized(tmp_path / "wan", device="cpu")), expected)


def test_scaled_weights_and_delayed_input_state(tmp_path):
    """Per-tensor weight scales are stored (.prescale) and delayed activation scales come back."""
    model, r = quantized_lm("tiny-llama", {"weight": {"format": "hif8", "scaling": "current"},
                                           "input": {"format": "hif8", "scaling": "delayed"}})
    model.train()
    with torch.no_grad():
        for seed in range(3):              # fill the amax histories; scales update before each forward
            model(tokens(seed))
    model.eval()
    ids = tokens(5)
    expected = logits(model, ids)
    export_model(model, r, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert same_bits(logits(loaded, ids), expected)
    q = loaded.model.layers[0].mlp.down_proj.input_quantizer
    assert torch.equal(q.scale, model.model.layers[0].mlp.down_proj.input_quantizer.scale) and q.scale.item() > 0
    with safe_open(str(tmp_path / "ckpt" / "lpq_packed.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.down_proj.weight.prescale" in f.keys()


def test_on_grid_weights_with_searched_scales_are_packed(tmp_path):
    """GPTQ-style HiF4 weights (scale search, not what re-encoding picks) still get exact codes."""
    from lpq.formats import grid

    model, r = quantized_lm("tiny-llama", {"format": "hif4"})
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_quantized_weight(grid.fake_quant(m.weight.float(), "hif4", search=True).to(m.weight.dtype))
    ids = tokens()
    expected = logits(model, ids)
    report = export_model(model, r, tmp_path / "ckpt")
    assert report.dense_fallbacks == [] and report.bits_per_param == 4.5
    assert same_bits(logits(load_quantized(tmp_path / "ckpt"), ids), expected)


def test_weight_off_the_grid_is_stored_unpacked(tmp_path):
    model, r = quantized_lm("tiny-llama", {"format": "mxfp4"})
    lin = model.model.layers[0].mlp.up_proj
    lin.set_quantized_weight(torch.full_like(lin.weight, 0.3))      # 0.3 is on no MXFP4 grid
    ids = tokens()
    expected = logits(model, ids)
    with pytest.warns(UserWarning, match="stored unpacked"):
        report = export_model(model, r, tmp_path / "ckpt")
    assert report.dense_fallbacks == ["model.layers.0.mlp.up_proj.weight"]
    assert same_bits(logits(load_quantized(tmp_path / "ckpt"), ids), expected)


def test_qk_rotation_survives_the_round_trip(tmp_path):
    # The rotation is part of the recipe the checkpoint stores: the loaded model rotates Q and K as the
    # exported one did, so its logits are the same bits (and differ from the unrotated model's).
    section = {"format": "hif8", "attention": {"format": "hif8", "qk_rotation": "hadamard"}, "protected_blocks": [1]}
    model, r = quantized_lm("tiny-llama", section, torch.float32)
    plain, _ = quantized_lm("tiny-llama", {**section, "attention": {"format": "hif8"}}, torch.float32)
    ids = tokens()
    expected = logits(model, ids)
    assert not same_bits(logits(plain, ids), expected)
    export_model(model, r, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")

    assert same_bits(logits(loaded, ids), expected)
    attention = [m for m in loaded.modules() if isinstance(m, AttentionQuantizers)]
    assert attention and all(m.qk_rotation == QKRotation.HADAMARD for m in attention)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert qc["recipe"]["attention"]["qk_rotation"] == "hadamard"
