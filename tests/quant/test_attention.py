import pytest
import torch

import lpq
from lpq.formats import fake_quant
from lpq.quant import AttentionRecipe, QuantizerSpec, QuantRecipe
from lpq.quant.attention import AttentionQuantizers, quantized_attention
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
