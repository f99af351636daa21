import pytest
import torch

import lpq
from lpq.formats import fake_quant
from lpq.quant import AttentionRecipe, QKRotation, QuantizerSpec, QuantRecipe
from lpq.quant.attention import AttentionQuantizers, quantized_attention, rotate_heads
from tests.quant.tiny import LLMS, build, networks, run


@pytest.mark.parametrize("name", LLMS + ["tiny-wan21"])
def test_explicit_attention_path_matches_the_original_math(name):
    # With every Q/K/V/P quantizer removed, the quantized path is plain attention: it must agree
    # with the model's own attention (padding mask, causal mask, GQA, rotary embeddings).
    model, family = build(name)
    ref = run(model)
    lpq.quantize_model(model, QuantRecipe(attention=AttentionRecipe(format="hif8"), adapter=family))
    for m in model.modules():
        if isinstance(m, AttentionQuantizers):
            m.q_quantizer = m.k_quantizer = m.v_quantizer = m.p_quantizer = None
    out = run(model)
    if name in LLMS:   # the 3 left-padded positions of row 1 attend to nothing: their output is arbitrary
        out, ref = torch.cat([out[0], out[1, 3:]]), torch.cat([ref[0], ref[1, 3:]])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_quantized_attention_equals_manual_fake_quant():
    torch.manual_seed(0)
    aq = AttentionQuantizers(AttentionRecipe(format="hif8"))
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    out = quantized_attention(aq, q, k, v, None, 0.25, causal=True)
    fq = lambda t, axis: fake_quant(t, "hif8", axis)
    kq, vq = fq(k, -1).repeat_interleave(2, 1), fq(v, -2).repeat_interleave(2, 1)
    s = fq(q, -1) @ kq.transpose(-1, -2) * 0.25
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), torch.finfo(s.dtype).min)
    assert torch.equal(out, fq(torch.softmax(s, -1), -1) @ vq)


def test_each_attention_module_has_its_own_scaling_state():
    model, _ = build("tiny-qwen3")
    spec = {"format": "hif8", "scaling": "delayed"}
    recipe = QuantRecipe(attention=AttentionRecipe(q=QuantizerSpec(**spec), p=QuantizerSpec(**spec, axis=-1)))
    lpq.quantize_model(model, recipe)
    model.train()
    run(model, 0)
    run(model, 1)
    scales = [m.q_quantizer.scale for m in model.modules() if isinstance(m, AttentionQuantizers)]
    assert len(scales) == 2 and all(bool(s > 0) for s in scales)
    assert all(m.k_quantizer is None for m in model.modules() if isinstance(m, AttentionQuantizers))


def test_wan_pipeline_attention_in_both_experts():
    pipe, _ = build("tiny-wan22")
    lpq.quantize_model(pipe, QuantRecipe(format="hif8", attention=AttentionRecipe(format="hif8")))
    for net in networks(pipe):
        attn = [m for m in net.modules() if isinstance(m, AttentionQuantizers)]
        assert len(attn) == 4     # attn1 and attn2 of 2 blocks


# ---------------------------------------------------------------- Q/K rotation

@pytest.mark.parametrize("head_dim", [16, 80])    # 80: blocks of 64 and 16
def test_rotate_heads_is_orthogonal_and_keeps_the_scores(head_dim):
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, head_dim, dtype=torch.float64), torch.randn(2, 3, 7, head_dim, dtype=torch.float64)
    rq, rk = rotate_heads(q.float()).double(), rotate_heads(k.float()).double()
    torch.testing.assert_close(rq @ rk.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rq, q.float().double(), atol=1e-2)      # it does rotate


@pytest.mark.parametrize("impl", ["materialized", "tiled"])
def test_qk_rotation_quantizes_the_rotated_rows(impl):
    # Rotation on: exactly the unrotated computation fed with Q H and K H (bit for bit, every path).
    torch.manual_seed(0)
    spec = {"format": "hif8", "scaling": "current"}
    roles = {r: QuantizerSpec(**spec, axis=-2 if r == "v" else -1) for r in ("q", "k", "v", "p")}
    rotated = AttentionQuantizers(AttentionRecipe(**roles, qk_rotation=QKRotation.HADAMARD))
    plain = AttentionQuantizers(AttentionRecipe(**roles))
    for aq in (rotated, plain):
        aq.impl, aq.block_q, aq.block_k = impl, 4, 4
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    out = quantized_attention(rotated, q, k, v, None, 0.25, causal=True)
    assert torch.equal(out, quantized_attention(plain, rotate_heads(q), rotate_heads(k), v, None, 0.25, causal=True))
    assert not torch.equal(out, quantized_attention(plain, q, k, v, None, 0.25, causal=True))


def test_qk_rotation_without_qk_quantizers_changes_only_rounding():
    torch.manual_seed(0)
    recipe = AttentionRecipe(v=QuantizerSpec("hif8", axis=-2), p=QuantizerSpec("hif8"), qk_rotation="hadamard")
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    plain = AttentionQuantizers(AttentionRecipe(v=QuantizerSpec("hif8", axis=-2), p=QuantizerSpec("hif8")))
    torch.testing.assert_close(quantized_attention(AttentionQuantizers(recipe), q, k, v, None, 0.25, True),
                               quantized_attention(plain, q, k, v, None, 0.25, True), atol=1e-2, rtol=0)


def test_qk_rotation_reads_from_yaml_and_names_the_choices():
    from lpq.config import from_dict, to_dict

    recipe = from_dict({"attention": {"format": "hif8", "qk_rotation": "hadamard"}}, QuantRecipe)
    assert recipe.attention.qk_rotation == QKRotation.HADAMARD
    stored = to_dict(recipe)      # as a checkpoint stores its recipe
    assert stored["attention"]["qk_rotation"] == "hadamard"
    assert from_dict(stored, QuantRecipe).attention.qk_rotation == QKRotation.HADAMARD
    assert from_dict({"attention": {"format": "hif8"}}, QuantRecipe).attention.qk_rotation == QKRotation.NONE
    with pytest.raises(ValueError, match="none.*hadamard|hadamard.*none"):
        from_dict({"attention": {"format": "hif8", "qk_rotation": "givens"}}, QuantRecipe)


@pytest.mark.parametrize("name", LLMS + ["tiny-wan21"])
def test_qk_rotation_in_a_model_is_float_exact_without_qk_rounding(name):
    model, family = build(name)
    ref = run(model)
    lpq.quantize_model(model, QuantRecipe(attention=AttentionRecipe(format="hif8", qk_rotation="hadamard"),
                                          adapter=family))
    attention = [m for net in networks(model) for m in net.modules() if isinstance(m, AttentionQuantizers)]
    assert attention and all(m.qk_rotation == QKRotation.HADAMARD and m.quant_enabled for m in attention)
    for m in attention:
        m.q_quantizer = m.k_quantizer = m.v_quantizer = m.p_quantizer = None
    out = run(model)
    if name in LLMS:   # the left-padded positions attend to nothing (see the first test)
        out, ref = torch.cat([out[0], out[1, 3:]]), torch.cat([ref[0], ref[1, 3:]])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
