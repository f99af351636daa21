"""The materialized reference path: causal row chunks against the whole P, grouped-query heads."""
from __future__ import annotations

import pytest
import torch

import lpq
from lpq.formats import fake_quant
from lpq.models.tiny import tiny_causal_lm
from lpq.quant import AttentionRecipe, QuantizerSpec, QuantRecipe
from lpq.quant.attention import AttentionQuantizers, quantized_attention
from lpq.quant.materialized_attention import _grouped_matmul, materialized_attention
from lpq.quant.quantizer import update_delayed_scales
from tests.quant.tiny import LargestTensor

WHOLE = 10 ** 9   # rows per chunk that make one chunk of any call: the whole P


def _quantizers(fmt: str = "hif8", scaling: str = "none") -> AttentionQuantizers:
    spec = dict(format=fmt, scaling=scaling) if scaling != "none" else dict(format=fmt)
    if scaling != "none" and fmt != "hif8":
        spec.update(target="amax", amax_target=4.0)
    aq = AttentionQuantizers(AttentionRecipe(q=QuantizerSpec(**spec), k=QuantizerSpec(**spec),
                                             v=QuantizerSpec(**spec, axis=-2), p=QuantizerSpec(**spec)))
    aq.impl = "materialized"
    return aq


def _inputs(b=2, h=6, hkv=2, sq=70, skv=70, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 1.5).requires_grad_()
    return mk(b, h, sq, d), mk(b, hkv, skv, d), mk(b, hkv, skv, d)


def _run(aq, q, k, v, rows, steps=3, mask=None, causal=True):
    """Output and input gradients of the last of `steps` training calls (delayed scaling: the first
    call measures, later ones use the stored scale)."""
    aq.causal_rows = rows
    aq.train()
    for step in range(steps):
        update_delayed_scales(aq)
        for t in (q, k, v):
            t.grad = None
        out = quantized_attention(aq, q, k, v, mask, 0.3, causal, training=True)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
        out.backward(g)
    return out.detach(), *(t.grad.clone() for t in (q, k, v))


@pytest.mark.parametrize("scaling", ["none", "current", "delayed"])
@pytest.mark.parametrize("sq,skv", [(70, 70), (37, 80)])   # a partial last chunk; a key cache ahead of the queries
def test_causal_chunks_match_the_whole_p(scaling, sq, skv):
    q, k, v = _inputs(sq=sq, skv=skv)
    chunked, whole = _quantizers("hif8", scaling), _quantizers("hif8", scaling)
    got = _run(chunked, q, k, v, rows=16)
    want = _run(whole, q, k, v, rows=WHOLE)
    # The same P decisions: only sums over keys and over the chunks round differently.
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    a, b = chunked.p_quantizer, whole.p_quantizer
    if scaling != "none":
        assert torch.equal(a.scale, b.scale)
        torch.testing.assert_close(a.amax_history, b.amax_history, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.rms_history, b.rms_history, rtol=1e-6, atol=0)
    if scaling == "delayed":
        torch.testing.assert_close(a.amax_pending, b.amax_pending, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.rms_pending, b.rms_pending, rtol=1e-6, atol=0)
        assert bool((a.amax_pending > 0).all())


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4"])
def test_causal_chunks_end_on_whole_format_blocks(fmt):
    # Chunks of 16 rows would end inside a 32- or 64-key block: the chunk runs on to the block's end
    # (its extra keys masked), so every block is quantized with the keys the whole P gives it.
    q, k, v = _inputs(sq=100, skv=100)
    got = _run(_quantizers(fmt, "current"), q, k, v, rows=16, steps=1)
    want = _run(_quantizers(fmt, "current"), q, k, v, rows=WHOLE, steps=1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_causal_chunks_track_the_same_statistics():
    q, k, v = _inputs()
    stats = {}
    for rows in (16, WHOLE):
        aq = _quantizers("hif8", "current")
        aq.p_quantizer.track_stats = True
        aq.causal_rows = rows
        with torch.no_grad():
            quantized_attention(aq, q * 4, k * 4, v, None, 0.3, True)
        stats[rows] = aq.p_quantizer.last_stats
    assert stats[16].keys() == stats[WHOLE].keys()
    for key, want in stats[WHOLE].items():
        got = stats[16][key]
        assert (got is None) == (want is None) and (want is None or abs(got - want) <= 1e-6 * max(abs(want), 1e-6)), key


def test_causal_chunks_skip_the_masked_keys():
    # 64 queries in chunks of 16: the largest score tensor is the last chunk's 16 x 64, not 64 x 64.
    b, h, s = 1, 2, 64
    q, k, v = _inputs(b=b, h=h, hkv=h, sq=s, skv=s, d=8)
    aq = _quantizers("hif8", "delayed")
    aq.causal_rows = 16
    with LargestTensor() as mode:
        quantized_attention(aq, q, k, v, None, 0.3, True, training=True).sum().backward()
    assert mode.largest == b * h * 16 * s


def test_masks_and_nvfp4_take_the_whole_p():
    q, k, v = _inputs(sq=40, skv=40)
    visible = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    visible[1, :, :, :5] = False
    got = _run(_quantizers(), q, k, v, rows=16, steps=1, mask=visible, causal=False)
    want = _run(_quantizers(), q, k, v, rows=WHOLE, steps=1, mask=visible, causal=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    aq = _quantizers("nvfp4")
    aq.causal_rows = 16
    with LargestTensor() as mode:
        quantized_attention(aq, q, k, v, None, 0.3, True)
    assert mode.largest == 2 * 6 * 40 * 40    # NVFP4's per-tensor scale: P in one piece


def test_grouped_heads_pair_as_repeat_interleave():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 5, 8, generator=g), torch.randn(2, 2, 8, 7, generator=g)
    torch.testing.assert_close(_grouped_matmul(a, b), a @ b.repeat_interleave(3, 1), rtol=1e-6, atol=1e-6)


def test_unquantized_p_equals_plain_attention():
    q, k, v = _inputs(sq=50, skv=50)
    out = materialized_attention(q, k, v, None, 0.3, True, None, rows=16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        materialized_attention(q, k, v, None, 0.3, True, None, rows=0)


def test_quantized_p_by_hand():
    # 20 queries in chunks of 8, HiF8 P without scaling: each chunk's P quantized elementwise.
    q, k, v = (t.detach() for t in _inputs(b=1, h=2, hkv=2, sq=20, skv=20))
    aq = _quantizers()
    aq.q_quantizer = aq.k_quantizer = aq.v_quantizer = None
    aq.causal_rows = 8
    out = quantized_attention(aq, q, k, v, None, 0.3, True)
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), -torch.inf)
    torch.testing.assert_close(out, fake_quant(torch.softmax(s, -1), "hif8") @ v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_models_without_padding_take_the_chunks_and_keep_their_math(name, monkeypatch):
    # No padding: transformers passes no mask and is_causal, so the chunked path runs (4-row chunks of
    # 12 tokens). With every Q/K/V/P quantizer removed it must be the model's own attention.
    model = tiny_causal_lm(name)
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    lpq.quantize_model(model, QuantRecipe(attention=AttentionRecipe(format="hif8")))
    calls = []
    for m in model.modules():
        if isinstance(m, AttentionQuantizers):
            m.q_quantizer = m.k_quantizer = m.v_quantizer = m.p_quantizer = None
            m.impl, m.causal_rows = "materialized", 4
    from lpq.quant import materialized_attention as mat
    orig = mat._causal_chunks
    monkeypatch.setattr(mat, "_causal_chunks", lambda *a: calls.append(1) or orig(*a))
    out = model(input_ids=ids).logits
    assert calls
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
