"""load_quantized(keep_packed=True): codes in memory, decoded per forward, outputs bit for bit the dense load's."""
from __future__ import annotations

import pytest
import torch

from lpq.export import export_model, load_quantized
from lpq.export.resident import packed_resident
from lpq.quant import QuantExperts
from tests.export.helpers import logits, quantized_lm, recipe, same_bits, tokens, wan_forward


def _weight_bytes(net: torch.nn.Module, keys: set[str]) -> int:
    return sum(t.numel() * t.element_size() for n, t in net.named_parameters() if n in keys)


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "hif8"])
@pytest.mark.parametrize("name, dtype", [("tiny-llama", torch.bfloat16), ("tiny-qwen3-moe", torch.float32)])
def test_packed_resident_outputs_equal_the_dense_load_and_hold_only_the_codes(tmp_path, name, dtype, fmt):
    model, r = quantized_lm(name, {"format": fmt, "attention": {"format": "hif8"}, "protected_blocks": [1]}, dtype)
    export_model(model, r, tmp_path / "ckpt")
    dense = load_quantized(tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", keep_packed=True)
    ids = tokens()

    assert same_bits(logits(packed, ids), logits(dense, ids))
    resident = packed_resident(packed)
    quantized = {n for n, _ in dense.named_parameters()} - {n for n, t in packed.named_parameters() if not t.is_meta}
    assert set(resident) == quantized and resident                 # every quantized weight, nothing else
    if name == "tiny-qwen3-moe":
        assert "model.layers.0.mlp.experts.gate_up_proj" in resident
        assert isinstance(packed.model.layers[0].mlp.experts, QuantExperts)
    # Between forwards the weights are placeholders again, and the codes are what is held.
    assert all(t.is_meta for n, t in packed.named_parameters() if n in resident)
    held = sum(w.nbytes for w in resident.values())
    bits = {"hif4": 4.5, "mxfp4": 4.25, "hif8": 8.0}[fmt]
    ideal = _weight_bytes(dense, set(resident)) * bits / (8 * dtype.itemsize)
    if name == "tiny-llama":        # every quantized dim is a multiple of 64: no padding
        assert held == ideal
    else:                           # some of the tiny MoE's widths are padded to whole blocks
        assert ideal <= held < 1.3 * ideal


def test_packed_resident_wan_pipeline_equals_the_dense_load(tmp_path):
    from lpq.models.tiny import tiny_wan_pipeline
    from lpq.quant import quantize_model

    pipe = tiny_wan_pipeline(two_experts=True)
    r = recipe({"format": "hif4", "attention": {"format": "hif8"}})
    quantize_model(pipe, r)
    export_model(pipe, r, tmp_path / "wan")
    dense, packed = load_quantized(tmp_path / "wan"), load_quantized(tmp_path / "wan", keep_packed=True, device="cpu")
    for n in ("transformer", "transformer_2"):
        assert packed_resident(getattr(packed, n))
        assert same_bits(wan_forward(getattr(packed, n)), wan_forward(getattr(dense, n)))


def test_a_forward_that_raises_still_drops_the_decoded_weights(tmp_path):
    model, r = quantized_lm("tiny-llama", {"format": "hif4"})
    export_model(model, r, tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", keep_packed=True)
    proj = packed.model.layers[0].mlp.down_proj
    with pytest.raises(RuntimeError):
        proj(torch.ones(3, 7))                        # wrong width: the matmul raises inside the forward
    assert proj.weight.is_meta


def test_a_packed_resident_model_is_not_exported_again(tmp_path):
    model, r = quantized_lm("tiny-llama", {"format": "hif4"})
    export_model(model, r, tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", keep_packed=True)
    with pytest.raises(ValueError, match="keep_packed=True .* load it with keep_packed=False"):
        export_model(packed, None, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.gpu
def test_packed_resident_on_cuda_decodes_on_the_gpu_and_equals_the_dense_load(tmp_path):
    model, r = quantized_lm("tiny-qwen3-moe", {"format": "hif4", "attention": {"format": "hif8"}}, torch.bfloat16)
    export_model(model, r, tmp_path / "ckpt")
    dense = load_quantized(tmp_path / "ckpt", device="cuda")
    packed = load_quantized(tmp_path / "ckpt", device="cuda", keep_packed=True)
    assert all(w.packed.codes.is_cuda for w in packed_resident(packed).values())
    ids = tokens().cuda()
    assert same_bits(logits(packed, ids), logits(dense, ids))
