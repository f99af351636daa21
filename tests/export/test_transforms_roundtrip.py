"""A PTQ-shaped model (input transforms, GPTQ-like pre-quantized weights, protected blocks) exports
and reloads bit-exactly; transforms that cannot be exported are refused."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from lpq.export import export_model, load_quantized
from lpq.export import layout as L
from lpq.formats import fake_quant
from lpq.quant import InputTransform, QuantLinear, set_input_transform
from tests.export.helpers import logits, quantized_lm, same_bits, tokens


def _scale(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 3 + 0.25


def _ptq_like(dtype: torch.dtype = torch.bfloat16):
    """Tiny Llama, hif4, block 1 protected; block 0's q/k/v share a smoothed + rotated input, its
    down_proj is rotated only, and every quantized weight is a pre-quantized GPTQ-like value; the
    protected block's o_proj keeps an online rotation (PTQ rotates protected blocks too)."""
    model, r = quantized_lm("tiny-llama", {"format": "hif4", "protected_blocks": [1]}, dtype)
    s = _scale(64, seed=1)
    for name in ("q_proj", "k_proj", "v_proj"):
        set_input_transform(model, f"model.layers.0.self_attn.{name}", InputTransform(64, s))
    set_input_transform(model, "model.layers.0.mlp.down_proj", InputTransform(64))
    protected = set_input_transform(model, "model.layers.1.self_attn.o_proj", InputTransform(64, _scale(64, seed=2)))
    protected.quant_enabled = False           # what a per-block switch leaves on a protected block: no effect here
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
            w = m.weight.detach().float()
            m.set_quantized_weight(fake_quant(w * 1.1 + 0.01 * torch.randn(w.shape, generator=g), "hif4").to(dtype))
    return model, r


def test_ptq_like_model_round_trips_bit_exactly(tmp_path):
    model, r = _ptq_like()
    ids = tokens()
    expected = logits(model, ids)
    report = export_model(model, r, tmp_path / "ckpt")
    assert report.dense_fallbacks == []
    loaded = load_quantized(tmp_path / "ckpt")

    assert same_bits(logits(loaded, ids), expected)
    assert same_bits(logits(copy.deepcopy(loaded).to(torch.bfloat16), ids), expected)
    index = json.loads((tmp_path / "ckpt" / L.INDEX).read_text())
    assert index["lpq_export_version"] == 2
    assert index["input_transforms"]["model.layers.0.mlp.down_proj"] == {"hadamard_block": 64, "input_scale": None}
    key = "model.layers.1.self_attn.o_proj.input_transform.input_scale"
    assert index["input_transforms"]["model.layers.1.self_attn.o_proj"] == {"hadamard_block": 64, "input_scale": key}
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.o_proj"):
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert b.input_transform.hadamard_block == 64
        assert same_bits(b.input_transform.input_scale, a.input_transform.input_scale)
        assert b.input_transform.input_scale.dtype == torch.float32
    assert loaded.model.layers[0].self_attn.q_proj.weight_prequantized
    protected = loaded.model.layers[1].self_attn.o_proj
    assert isinstance(protected, QuantLinear) and protected.weight_quantizer is None
    assert type(loaded.model.layers[1].self_attn.q_proj) is torch.nn.Linear


def test_plain_callable_transform_is_refused(tmp_path):
    model, r = quantized_lm("tiny-llama", {"format": "hif4"})
    model.model.layers[0].mlp.up_proj.input_transform = lambda x: x.flip(-1)
    with pytest.raises(TypeError, match=r"model.layers.0.mlp.up_proj.input_transform is a function, which cannot "
                                        r"be exported; use lpq.quant.InputTransform"):
        export_model(model, r, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_fake_export_refuses_input_transforms(tmp_path):
    model, r = quantized_lm("tiny-llama", {"format": "hif4"})
    set_input_transform(model, "model.layers.0.mlp.up_proj", InputTransform(64))
    with pytest.raises(ValueError, match="stock transformers/diffusers models cannot run.*use kind='packed'"):
        export_model(model, r, tmp_path / "ckpt", kind="fake")


def test_version_1_exports_are_still_read():
    meta = {**L.versions(), "lpq_export_version": 1}
    L.check_versions(meta, "lpq_index.json")
    with pytest.raises(L.CheckpointError, match="reads only versions 1, 2"):
        L.check_versions({**meta, "lpq_export_version": 3}, "lpq_index.json")
