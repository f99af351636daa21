"""Residual-stream rotation preserves the fp32 model's function and makes R orthogonal."""
import pytest
import torch

from lpq.algorithms.rotation import random_orthogonal, rotate_residual
from lpq.models.tiny import tiny_causal_lm, tiny_wan_transformer


def test_random_orthogonal_is_orthogonal_and_seeded():
    R = random_orthogonal(96, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(96, dtype=torch.float64), atol=1e-12)
    assert torch.equal(R, random_orthogonal(96, seed=3)) and not torch.equal(R, random_orthogonal(96, seed=4))


@pytest.mark.parametrize("name,tied", [("tiny-llama", False), ("tiny-qwen3", False), ("tiny-llama", True)])
def test_rotated_model_has_the_same_logits(name, tied):
    model = tiny_causal_lm(name)
    with torch.no_grad():   # non-trivial norm weights, so that folding them matters
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.uniform_(0.5, 1.5)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        before = model.model.layers[0].mlp.down_proj.weight.clone()
        rotate_residual(model, seed=0)
        out = model(ids).logits
    assert not torch.allclose(model.model.layers[0].mlp.down_proj.weight, before)
    assert (out - ref).abs().max() < 1e-4
    if tied:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert model.config.tie_word_embeddings is False


def test_unsupported_models_are_refused():
    """The adapter says what a residual rotation touches; families without that map are refused."""
    with pytest.raises(ValueError, match="the wan family has no residual-stream map"):
        rotate_residual(tiny_wan_transformer())
    with pytest.raises(ValueError, match="qwen3_moe family has no residual-stream map.*fused MoE experts"):
        rotate_residual(tiny_causal_lm("tiny-qwen3-moe"))
    broken = tiny_causal_lm("tiny-llama")
    del broken.model.layers[0].post_attention_layernorm
    with pytest.raises(ValueError, match="has no post_attention_layernorm"):
        rotate_residual(broken)
