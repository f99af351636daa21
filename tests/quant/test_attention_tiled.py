"""The tiled quantized attention against the materialized reference path.

Agreement bounds (stated once, used throughout):
* quantized P: every element whose decision differs between the paths lies in a format block
  (one element for HiF8) where the float P differs (the two paths round exp and the normalization
  differently; P agrees within 1e-6 + 2 ulp of the dtype); at most 0.1 % of the decisions differ;
* O and dV: within 2e-5 + |Pq_tiled - Pq_materialized| @ |V| (resp. |dO|), i.e. float rounding
  plus whatever a differing P decision moves;
* dQ, dK: within float rounding (rtol 1e-4, atol 2e-5): they depend on the float P, not on Pq.
In bfloat16 the materialized path rounds every intermediate to bfloat16: 2e-2 instead of 2e-5
above, and dQ, dK within 1 % in norm.
"""
from __future__ import annotations

import pytest
import torch

import lpq
from lpq.formats import fake_quant, get_format
from lpq.formats.api import fake_quant_scaled
from lpq.quant import AttentionRecipe, QuantizerSpec, QuantRecipe
from lpq.quant.attention import AttentionQuantizers, quantized_attention
from lpq.quant.quantizer import update_delayed_scales
from lpq.quant.scaling import compute_scale
from lpq.quant.p_quantization import PQuant
from lpq.quant.tiled_attention import _Problem, key_tile, tiled_quantized_attention
from tests.quant.tiny import LLMS, LargestTensor, build, run


def _quantizers(fmt: str = "hif8", scaling: str = "none", impl: str = "materialized", bq: int = 16,
                bk: int = 32) -> AttentionQuantizers:
    spec = dict(format=fmt, scaling=scaling) if scaling != "none" else dict(format=fmt)
    if scaling != "none" and fmt != "hif8":
        spec["target"] = "amax"
        spec["amax_target"] = 4.0
    aq = AttentionQuantizers(AttentionRecipe(q=QuantizerSpec(**spec), k=QuantizerSpec(**spec),
                                             v=QuantizerSpec(**spec, axis=-2), p=QuantizerSpec(**spec)))
    aq.impl, aq.block_q, aq.block_k = impl, bq, bk
    return aq


def _inputs(b=2, h=4, hkv=2, sq=40, skv=72, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 1.5).to(dtype).requires_grad_()
    return mk(b, h, sq, d), mk(b, hkv, skv, d), mk(b, hkv, skv, d)


def _padding_mask(kind: str, b: int, sq: int, skv: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    visible = torch.ones(b, 1, sq, skv, dtype=torch.bool).tril(diagonal=skv - sq)
    visible[1, :, :, :5] = False          # row 1 left-padded by 5 keys
    if kind == "bool":
        return visible
    return torch.zeros(b, 1, sq, skv).masked_fill(~visible, torch.finfo(torch.float32).min)


def _run(aq, q, k, v, mask, causal, grad_seed=1):
    out = quantized_attention(aq, q, k, v, mask, 0.3, causal)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), g)), g


def _materialized_pq(aq, q, k, v, mask, causal):
    """(float P, quantized P) of the materialized path, recomputed from its own operations."""
    with torch.no_grad():
        qq, kk, vv = (aq.quantize(r, t) for r, t in zip("qkv", (q, k, v)))
        kk = kk.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = qq @ kk.transpose(-1, -2) * 0.3
        sq, skv = s.shape[-2:]
        if mask is None and causal:
            mask = torch.ones(sq, skv, dtype=torch.bool).tril(diagonal=skv - sq)
        if mask is not None:
            s = s.masked_fill(~mask, torch.finfo(s.dtype).min) if mask.dtype == torch.bool else s + mask
        p = torch.softmax(s.float(), -1).to(q.dtype)
        return p, vv.repeat_interleave(q.shape[1] // v.shape[1], 1)


def _tiled_p(aq, q, k, v, mask, causal, scale):
    """(float P, quantized P) as the tiled path computes them, assembled from its tiles."""
    with torch.no_grad():
        qq, kk = aq.quantize("q", q), aq.quantize("k", k).repeat_interleave(q.shape[1] // k.shape[1], 1)
        prob = _Problem(qq, kk, kk, mask, 0.3, causal, aq.block_q, key_tile(aq.block_k, aq.p_quantizer))
        m, l = prob.row_stats()
        p = torch.zeros(*qq.shape[:-1], kk.shape[-2])
        pq = torch.zeros_like(p)
        quant = PQuant(aq.p_quantizer, scale)
        for i0, i1 in prob.tiles_q():
            for j0, j1 in prob.tiles_k(i0, i1):
                t = prob.probs(m, l, i0, i1, j0, j1).to(q.dtype)
                p[..., i0:i1, j0:j1], pq[..., i0:i1, j0:j1] = t.float(), quant(t).float()
        return p, pq


def _per_block_any(mask: torch.Tensor, block: int) -> torch.Tensor:
    """Whether any element of each element's format block (along the last dim) is set."""
    n = mask.shape[-1]
    padded = torch.nn.functional.pad(mask, (0, -n % block))
    blocks = padded.unflatten(-1, (-1, block)).any(-1, keepdim=True)
    return blocks.expand(*blocks.shape[:-1], block).flatten(-2)[..., :n]


def _compare(fmt, scaling, mask_kind, causal, hkv=2, dtype=torch.float32, train=True):
    q, k, v = _inputs(hkv=hkv, dtype=dtype)
    mask = _padding_mask(mask_kind, q.shape[0], q.shape[2], k.shape[2])
    results, quantizers = {}, {}
    for impl in ("materialized", "tiled"):
        aq = _quantizers(fmt, scaling, impl)
        aq.train(train)
        for step in range(3):     # delayed scaling: the first call, then calls with a stored scale
            update_delayed_scales(aq)
            results[impl], g = _run(aq, q, k, v, mask, causal, grad_seed=step)
        quantizers[impl] = aq
    # P decisions of the last step, with the scale that step used
    aq = quantizers["materialized"]
    aq.train(False)    # recomputing P must not record statistics
    p_mat, vv = _materialized_pq(aq, q, k, v, mask, causal)
    pq = aq.p_quantizer
    scale = None
    if scaling != "none":
        # the scale the last call used: the stored one, or (current scaling, or delayed scaling that
        # never stored one because it ran in evaluation) the one from this P's statistics
        pf = p_mat.float()
        scale = pq.scale if scaling == "delayed" and bool((pq.scale > 0).all()) else \
            compute_scale(pf.abs().amax().reshape(1), pf.square().mean().sqrt().reshape(1), pq.spec)
    pq_mat = (fake_quant_scaled(p_mat, fmt, float(scale)) if scale is not None else fake_quant(p_mat, fmt)).float()
    p_til, pq_til = _tiled_p(aq, q, k, v, mask, causal, float(scale) if scale is not None else None)
    differs = pq_mat != pq_til
    assert ((p_mat.float() - p_til).abs() <= 1e-6 + 2 * torch.finfo(dtype).eps * p_til).all()
    p_differs = _per_block_any(p_mat.float() != p_til, get_format(fmt).block)
    assert not (differs & ~p_differs).any(), "a P decision differs in a block where P itself agrees"
    assert differs.float().mean() < 1e-3
    dpq = (pq_mat - pq_til).abs()
    (o_m, dq_m, dk_m, dv_m), (o_t, dq_t, dk_t, dv_t) = results["materialized"], results["tiled"]
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert ((o_m - o_t).abs().float() <= tol + dpq @ vv.abs().float()).all()
    for got, want in ((dq_t, dq_m), (dk_t, dk_m)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=tol)
        else:   # the materialized path rounds every intermediate gradient to bfloat16
            assert (got.float() - want.float()).norm() <= 1e-2 * want.float().norm()
    groups = q.shape[1] // k.shape[1]
    dv_bound = (dpq.transpose(-1, -2) @ g.abs().float()).unflatten(1, (-1, groups)).sum(2)
    assert ((dv_m - dv_t).abs().float() <= tol + dv_bound).all()
    return quantizers


@pytest.mark.parametrize("mask_kind,causal", [("none", False), ("none", True), ("bool", False), ("additive", False)])
@pytest.mark.parametrize("hkv", [4, 2])
def test_tiled_matches_materialized_masks_and_gqa(mask_kind, causal, hkv):
    _compare("hif8", "none", mask_kind, causal, hkv=hkv)


@pytest.mark.parametrize("fmt", ["hif4", "mxfp4", "mxfp4-toolkit"])
def test_tiled_matches_materialized_block_formats(fmt):
    # key tiles of 32 keys hold whole blocks (HiF4's 64 rounds the tile up to 64)
    _compare(fmt, "none", "bool", False)


@pytest.mark.parametrize("scaling", ["current", "delayed"])
@pytest.mark.parametrize("train", [True, False])
def test_tiled_scaling_state_equals_materialized(scaling, train):
    qs = _compare("hif8", scaling, "additive", False, train=train)
    a, b = qs["materialized"].p_quantizer, qs["tiled"].p_quantizer
    assert torch.equal(a.scale, b.scale)
    # delayed scaling in evaluation never records statistics, so it never stores a scale
    assert bool((a.scale > 0).all()) == (scaling == "current" or train)
    torch.testing.assert_close(a.amax_history, b.amax_history, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.rms_history, b.rms_history, rtol=1e-6, atol=0)
    if scaling == "delayed":
        torch.testing.assert_close(a.amax_pending, b.amax_pending, rtol=1e-6, atol=0)
        torch.testing.assert_close(a.rms_pending, b.rms_pending, rtol=1e-6, atol=0)
        assert bool((a.amax_pending > 0).all()) == train


def test_tiled_bfloat16():
    _compare("hif8", "delayed", "bool", True, dtype=torch.bfloat16)


@pytest.mark.parametrize("scaling", ["none", "current"])
def test_tiled_track_stats_equal(scaling):
    q, k, v = _inputs()
    stats = {}
    for impl in ("materialized", "tiled"):
        aq = _quantizers("hif8", scaling, impl)
        aq.p_quantizer.track_stats = True
        with torch.no_grad():
            quantized_attention(aq, q * 4, k * 4, v, None, 0.3, True)
        stats[impl] = aq.p_quantizer.last_stats
    assert stats["tiled"].keys() == stats["materialized"].keys()
    for key, want in stats["materialized"].items():
        got = stats["tiled"][key]
        assert (got is None) == (want is None) and (want is None or abs(got - want) <= 1e-3 * max(abs(want), 1e-6)), key


def test_dropout_refused_by_tiled_and_auto_falls_back():
    q, k, v = _inputs()
    aq = _quantizers(impl="tiled")
    with pytest.raises(NotImplementedError, match="dropout"):
        quantized_attention(aq, q, k, v, None, 0.3, True, dropout=0.1, training=True)
    aq.impl = "auto"
    torch.manual_seed(0)
    out = quantized_attention(aq, q, k, v, None, 0.3, True, dropout=0.1, training=True)
    aq.impl = "materialized"
    torch.manual_seed(0)
    assert torch.equal(out, quantized_attention(aq, q, k, v, None, 0.3, True, dropout=0.1, training=True))
    aq.impl = "tiled"    # dropout only in training: evaluation takes the tiled path
    quantized_attention(aq, q, k, v, None, 0.3, True, dropout=0.1, training=False)


def test_auto_picks_tiled_only_beyond_one_tile():
    q, k, v = _inputs(sq=16, skv=32)
    calls = []
    aq = _quantizers(impl="auto")
    from lpq.quant import tiled_attention
    orig = tiled_attention.TiledQuantAttention.apply
    try:
        tiled_attention.TiledQuantAttention.apply = lambda *a: calls.append(1) or orig(*a)
        quantized_attention(aq, q, k, v, None, 0.3, True)
        assert not calls                    # 16 x 32 scores: one tile, materialized
        aq.block_k = 16
        quantized_attention(aq, q, k, v, None, 0.3, True)
        assert calls                        # two key tiles: tiled
        aq.p_quantizer = lpq.quant.quantizer.TensorQuantizer(QuantizerSpec("nvfp4"), "p")
        calls.clear()
        quantized_attention(aq, q, k, v, None, 0.3, True)
        assert not calls                    # nvfp4 P: only the materialized path computes it
    finally:
        tiled_attention.TiledQuantAttention.apply = orig
    aq.impl = "fast"
    with pytest.raises(ValueError, match="valid: auto, tiled, fused, materialized"):
        quantized_attention(aq, q, k, v, None, 0.3, True)


def test_no_tensor_grows_with_query_times_key_length():
    # Forward and backward of 512 x 512 attention in 32 x 64 tiles: no tensor created on the way
    # is larger than a tile of scores or than Q itself (the Sq x Skv scores would be 16x larger).
    b, h, s, d = 1, 2, 512, 16
    q, k, v = _inputs(b, h, h, s, s, d)
    aq = _quantizers("hif8", "delayed", "tiled", 32, 64)
    aq.train()
    with LargestTensor() as mode:
        out = quantized_attention(aq, q, k, v, None, 0.3, True)
        out.sum().backward()
    assert mode.largest <= max(b * h * 32 * 64, b * h * s * d)
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_tiled_function_alone_matches_sdpa():
    # No quantizers at all: the tiled function is exact attention (forward and gradients).
    q, k, v = _inputs(h=2, hkv=2, sq=33, skv=70)
    out = tiled_quantized_attention(q, k, v, None, 0.25, True, None, 8, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(33, 70, dtype=torch.bool).tril(diagonal=37), scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _set_impl(model, impl: str, bq: int = 4, bk: int = 8) -> None:
    for m in model.modules():
        if isinstance(m, AttentionQuantizers):
            m.impl, m.block_q, m.block_k = impl, bq, bk


@pytest.mark.parametrize("name", LLMS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_models_tiled_equals_materialized(name, attn):
    # GQA, causal and left-padding masks (bool from sdpa's mask function, additive from eager's)
    outs = {}
    for impl in ("materialized", "tiled"):
        model, family = build(name)
        model.set_attn_implementation(attn)
        lpq.quantize_model(model, QuantRecipe(attention=AttentionRecipe(format="hif8"), adapter=family))
        _set_impl(model, impl)
        out = run(model)
        outs[impl] = torch.cat([out[0], out[1, 3:]])    # the padded positions attend to nothing
    torch.testing.assert_close(outs["tiled"], outs["materialized"], rtol=1e-3, atol=1e-4)


def test_wan_i2v_rotary_and_image_context_tiled_equals_materialized():
    from diffusers import WanTransformer3DModel

    outs = {}
    for impl in ("materialized", "tiled"):
        torch.manual_seed(0)
        net = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                    in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                    num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                    image_dim=20, added_kv_proj_dim=24, rope_max_seq_len=32).eval()
        lpq.quantize_model(net, QuantRecipe(attention=AttentionRecipe(format="hif8")))
        _set_impl(net, impl, 8, 16)
        g = torch.Generator().manual_seed(1)
        outs[impl] = net(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([500]),
                         encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                         encoder_hidden_states_image=torch.randn(1, 40, 20, generator=g), return_dict=False)[0]
    assert net.blocks[0].attn2.add_k_proj is not None     # the image context path ran
    torch.testing.assert_close(outs["tiled"], outs["materialized"], rtol=1e-3, atol=1e-4)


def test_tiled_equals_fake_quant_by_hand():
    # The tiled path's semantics written out with whole tensors: Q, K along head dim, V along keys,
    # P along keys, all HiF8 without scaling.
    torch.manual_seed(0)
    aq = _quantizers(impl="tiled", bq=4, bk=8)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    out = quantized_attention(aq, q, k, v, None, 0.25, causal=True)
    fq = lambda t, axis: fake_quant(t, "hif8", axis)
    kq, vq = fq(k, -1).repeat_interleave(2, 1), fq(v, -2).repeat_interleave(2, 1)
    s = fq(q, -1) @ kq.transpose(-1, -2) * 0.25
    s = s.masked_fill(~torch.ones(6, 20, dtype=torch.bool).tril(diagonal=14), torch.finfo(s.dtype).min)
    torch.testing.assert_close(out, fq(torch.softmax(s, -1), -1) @ vq, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_tiled_on_cuda_matches_materialized_on_cuda(scaling):
    # on CUDA the P tiles go through the Triton kernels (quantization with fused statistics)
    q, k, v = (t.detach().cuda().requires_grad_() for t in _inputs(sq=300, skv=700))
    results, states = {}, {}
    for impl in ("materialized", "tiled"):
        aq = _quantizers("hif8", scaling, impl, 128, 256).cuda()
        aq.train()
        for step in range(3):
            update_delayed_scales(aq)
            results[impl], _ = _run(aq, q, k, v, None, True, grad_seed=step)
        states[impl] = {n: b.clone() for n, b in aq.p_quantizer.named_buffers()}
    for got, want in zip(results["tiled"], results["materialized"]):
        assert (got - want).norm() <= 1e-3 * want.norm()
    for name, want in states["materialized"].items():
        torch.testing.assert_close(states["tiled"][name], want, rtol=1e-5, atol=0)
