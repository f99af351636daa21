"""The real SmolLM2-135M, W4A4 HiF4: packed export is small and reloads bit-exactly."""
from __future__ import annotations

import pytest
import torch

from lpq.export import export_model, load_quantized
from lpq.models.hub import ModelConfig, load_model
from lpq.quant import quantize_model
from tests.export.helpers import recipe, same_bits


@pytest.mark.slow
def test_smollm2_w4a4_hif4_packed(tmp_path):
    loaded = load_model(ModelConfig("smollm2-135m", dtype="bfloat16"))
    r = recipe({"format": "hif4"})
    quantize_model(loaded.model, r)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded.model(ids).logits
    report = export_model(loaded.model, r, tmp_path / "smollm2", tokenizer=loaded.tokenizer)

    assert report.quantized_tensors == 30 * 7
    assert report.bits_per_param == 4.5
    assert report.quantized_ratio < 0.35
    assert report.total_ratio < 0.5       # the tied embedding stays bf16
    reloaded = load_quantized(tmp_path / "smollm2")
    with torch.no_grad():
        assert same_bits(reloaded(ids).logits, expected)
