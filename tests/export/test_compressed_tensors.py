"""Export kind compressed-tensors: checked with the compressed-tensors package and transformers' loader."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lpq.export import export_model, load_quantized
from lpq.export.packing import quantized_weights
from lpq.formats.mx import fake_quant_with_exponent_ref
from lpq.quant import InputTransform, set_input_transform
from tests.export.helpers import logits, quantized_lm, tokens

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme  # noqa: E402

W4A16 = {"weight": {"format": "mxfp4"}}


def _export(tmp_path, model, name="ct"):
    out = tmp_path / name
    export_model(model, None, out, kind="compressed-tensors")
    return out, json.loads((out / "config.json").read_text())["quantization_config"]


def _module_state(tensors: dict, name: str) -> dict:
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


def _decompressed(out, qc: dict) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as compressed-tensors' own decompressor gives it."""
    config = QuantizationConfig.model_validate(qc)
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(config.format)
    tensors = load_file(out / "model.safetensors")
    names = {k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")}
    return {n: compressor.decompress(_module_state(tensors, n), scheme)["weight"] for n in names}


def _lpq_weights(model) -> dict[str, torch.Tensor]:
    """lpq's forward weights under checkpoint names (fused experts split per expert)."""
    model.eval()
    out = {}
    for qw in quantized_weights(model):
        w = qw.forward_weight().detach()
        if qw.attr == "weight":
            out[qw.key.removesuffix(".weight")] = w
            continue
        base = qw.key.removesuffix(qw.attr)
        for e in range(w.shape[0]):
            if qw.attr == "gate_up_proj":
                gate, up = w[e].chunk(2)
                out[f"{base}{e}.gate_proj"], out[f"{base}{e}.up_proj"] = gate, up
            else:
                out[f"{base}{e}.down_proj"] = w[e]
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4-rceil", "mxfp4-toolkit"])
def test_mxfp4_decompressor_gives_lpq_weights_exactly(tmp_path, name, fmt):
    model, _ = quantized_lm(name, {"weight": {"format": fmt}, "input": {"format": fmt}})
    out, qc = _export(tmp_path, model)
    got, want = _decompressed(out, qc), _lpq_weights(model)
    assert set(got) == set(want)
    for n, w in want.items():
        assert torch.equal(got[n].float(), w.float()), n    # exact: E2M1 x 2^k fits the decompressor's bf16


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe"])
def test_nvfp4_codes_exact_and_values_within_the_inverse_scale_rounding(tmp_path, name):
    model, _ = quantized_lm(name, {"weight": {"format": "nvfp4"}}, dtype=torch.bfloat16)
    out, qc = _export(tmp_path, model)
    tensors = load_file(out / "model.safetensors")
    got, want = _decompressed(out, qc), _lpq_weights(model)
    mismatched = total = 0
    for n, w in want.items():
        # the global scale is lpq's multiplier inverted: fp32(1/s)
        assert tensors[f"{n}.weight_global_scale"].dtype == torch.float32
        assert tensors[f"{n}.weight_scale"].dtype == torch.float8_e4m3fn
        g = got[n].float()
        # compressed-tensors multiplies by fp32(b / fp32(1/s)) where lpq multiplies by s: one bf16 step at most
        assert torch.all((g - w.float()).abs() <= w.float().abs() * 2.0 ** -7), n
        mismatched += int((g != w.float()).sum())
        total += w.numel()
    assert mismatched < 0.01 * total


def test_config_matches_the_packages_presets_and_ignores_what_lpq_left_unquantized(tmp_path):
    model, _ = quantized_lm("tiny-qwen3-moe", {"format": "mxfp4", "protected_blocks": [0]})
    _, qc = _export(tmp_path, model)
    config = QuantizationConfig.model_validate(qc)
    scheme = config.config_groups["group_0"]
    preset = preset_name_to_scheme("MXFP4", ["Linear"])
    assert scheme.weights == preset.weights and scheme.input_activations == preset.input_activations
    assert "lm_head" in config.ignore
    assert "model.layers.0.self_attn.q_proj" in config.ignore          # protected block
    assert "model.layers.0.mlp.experts.0.gate_proj" in config.ignore
    assert "model.layers.1.mlp.gate" in config.ignore                   # the router is not quantized
    assert not any(n.startswith("model.layers.1.self_attn.") for n in config.ignore)


def test_nvfp4_weight_only_config_is_the_nvfp4a16_preset(tmp_path):
    model, _ = quantized_lm("tiny-llama", {"weight": {"format": "nvfp4"}})
    _, qc = _export(tmp_path, model)
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    assert scheme.weights == preset_name_to_scheme("NVFP4A16", ["Linear"]).weights
    assert scheme.input_activations is None and qc["format"] == "nvfp4-pack-quantized"


def _runtime(out, like):
    """transformers' own load of the folder. compressed-tensors decompresses FP4 weights to bfloat16, so the
    models are bf16; the rotary tables of `like` (built in memory, then cast) are copied for a like-for-like
    comparison (from_pretrained computes them in float32)."""
    from transformers import AutoModelForCausalLM

    runtime = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = dict(like.named_buffers())
    for name, buf in runtime.named_buffers():
        if "inv_freq" in name:
            buf.copy_(theirs[name].float())
    return runtime


def test_transformers_loads_weight_only_export_with_lpq_outputs(tmp_path):
    model, _ = quantized_lm("tiny-llama", W4A16, dtype=torch.bfloat16)
    out, _ = _export(tmp_path, model)
    export_model(model, None, tmp_path / "packed")
    ids = tokens()
    want = logits(load_quantized(tmp_path / "packed"), ids)
    got = logits(_runtime(out, model), ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_learned_biases_reach_transformers_through_the_config_flags(tmp_path):
    """norm_distill.biases turns on Llama's attention_bias / mlp_bias: the compressed-tensors folder then
    loads in stock transformers with every bias and computes what lpq's packed export does."""
    from lpq.algorithms.norm_distill import learnable_biases
    from lpq.models.adapters import get_adapter

    model, _ = quantized_lm("tiny-llama", W4A16, dtype=torch.bfloat16)
    with torch.no_grad():
        for b in learnable_biases(model, get_adapter(model)):
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())) * 0.1)
    out, _ = _export(tmp_path, model)
    export_model(model, None, tmp_path / "packed")
    ids = tokens()
    runtime = _runtime(out, model)
    assert runtime.config.attention_bias and runtime.config.mlp_bias
    torch.testing.assert_close(logits(runtime, ids), logits(load_quantized(tmp_path / "packed"), ids), rtol=0, atol=0)


def _runtime_mx_rule(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic MXFP4 activation rule, as measured: OCP's exponent floor(log2 amax) - 2,
    one higher when amax's mantissa is >= 1.75 (it rounds amax to a power of two before taking the log)."""
    x2d = x.float().reshape(-1, 32)
    bits = x2d.abs().amax(1).view(torch.int32)
    exp = (bits >> 23) - 129 + ((bits & 0x7FFFFF) >= 0x600000).to(torch.int32)
    return fake_quant_with_exponent_ref(x2d, exp.clamp(min=-127).unsqueeze(1).expand(-1, 1)).reshape(x.shape)


def test_runtime_activation_rule_is_ocp_with_amax_rounded_to_a_power_of_two():
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.quant_config import QuantizationStatus

    scheme = preset_name_to_scheme("MXFP4", ["Linear"])
    holder = torch.nn.Linear(64, 8)
    holder.quantization_status = QuantizationStatus.COMPRESSED
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 3
    got = forward_quantize(holder, x, "input", scheme.input_activations)
    torch.testing.assert_close(got, _runtime_mx_rule(x), rtol=0, atol=0)


def test_transformers_runs_w4a4_export_close_to_lpq(tmp_path):
    model, _ = quantized_lm("tiny-llama", {"format": "mxfp4"}, dtype=torch.bfloat16)
    out, _ = _export(tmp_path, model)
    export_model(model, None, tmp_path / "packed")
    ids = tokens()
    want = logits(load_quantized(tmp_path / "packed"), ids).float().log_softmax(-1)
    got = logits(_runtime(out, model), ids).log_softmax(-1)
    kl = (want.exp() * (want - got)).sum(-1).mean()
    assert 0 < kl < 0.05                          # the activation scale rules differ (see the test above)
    assert (want.argmax(-1) == got.argmax(-1)).float().mean() > 0.8


def test_block_hadamard_goes_to_transform_config_and_computes_lpqs_rotation(tmp_path):
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model, _ = quantized_lm("tiny-llama", W4A16, dtype=torch.bfloat16)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for n in names:
        set_input_transform(model, n, InputTransform(hadamard_block=32))
    out, qc = _export(tmp_path, model)
    group = qc["transform_config"]["config_groups"]["hadamard_32"]
    assert group["head_dim"] == 32 and group["apply"][0]["targets"] == names
    export_model(model, None, tmp_path / "packed")
    runtime = _runtime(out, model)
    apply_transform_config(runtime, TransformConfig.model_validate(qc["transform_config"]))
    ids = tokens()
    torch.testing.assert_close(logits(runtime, ids), logits(load_quantized(tmp_path / "packed"), ids),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("data, setup, message", [
    ({"format": "hif4"}, None, "hif4 weights cannot be written"),
    ({"weight": {"format": "nvfp4"}, "input": {"format": "nvfp4"}}, None, "static input_global_scale"),
    ({"weight": {"format": "mxfp4"}, "input": {"format": "hif8"}}, None, "has no compressed-tensors scheme"),
    ({"format": "mxfp4", "attention": {"format": "hif8"}}, None, "attention quantization"),
    (W4A16, lambda m: set_input_transform(m, "model.layers.0.self_attn.q_proj",
                                          InputTransform(input_scale=torch.full((64,), 2.0))), "online per-channel input scale"),
    (W4A16, lambda m: set_input_transform(m, "model.layers.0.mlp.down_proj", InputTransform(hadamard_block=256)),
     "not a multiple of the Hadamard block"),
])
def test_refusals_leave_nothing_behind(tmp_path, data, setup, message):
    model, _ = quantized_lm("tiny-llama", data)
    if setup is not None:
        setup(model)
    with pytest.raises(ValueError, match=message):
        export_model(model, None, tmp_path / "ct", kind="compressed-tensors")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_w4a16_mxfp4_runtime_equals_lpq(tmp_path):
    """The real model (GQA, tied embeddings) through transformers' compressed-tensors loader: lpq's logits."""
    from lpq.models.hub import ModelConfig, load_model
    from lpq.quant import quantize_model
    from tests.export.helpers import recipe

    loaded = load_model(ModelConfig("smollm2-135m", dtype="bfloat16"))
    quantize_model(loaded.model, recipe(W4A16))
    export_model(loaded.model, None, tmp_path / "ct", kind="compressed-tensors", tokenizer=loaded.tokenizer)
    export_model(loaded.model, None, tmp_path / "packed")
    ids = loaded.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    want = logits(load_quantized(tmp_path / "packed"), ids)
    torch.testing.assert_close(logits(_runtime(tmp_path / "ct", loaded.model), ids), want, rtol=0, atol=0)
