"""The fused Triton quantized attention (impl="fused") against the PyTorch tiled path, which
tests/quant/test_attention_tiled.py checks against the materialized reference with stated bounds.
The two tiled computations differ only in exp (Triton's), division and summation order, so they
agree to float32 rounding: outputs and gradients within 1e-4 in norm (float32; 1e-2 in bfloat16),
the P quantizer's scale exactly and its amax/RMS statistics within 1e-5. Small shapes: the
interpreter runs each program in numpy."""
from __future__ import annotations

import pytest
import torch

from lpq.quant.attention import quantized_attention
from lpq.quant.quantizer import update_delayed_scales
from tests.quant.test_attention_tiled import _inputs, _padding_mask, _quantizers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _steps(impl, q, k, v, mask, causal, scaling, train=True, track=False):
    aq = _quantizers("hif8", scaling, impl, 16, 32).to(DEVICE)
    aq.train(train)
    aq.p_quantizer.track_stats = track
    for step in range(2):
        update_delayed_scales(aq)
        out = quantized_attention(aq, q, k, v, mask, 0.3, causal)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(step)).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, (q, k, v), g)
    return (out, *grads), aq.p_quantizer


def _agree(fmt_dtype, a, b):
    tol = 1e-4 if fmt_dtype == torch.float32 else 1e-2
    for x, y in zip(a, b):
        assert (x.float() - y.float()).norm() <= tol * y.float().norm()


@pytest.mark.parametrize("mask_kind,causal,hkv", [("none", False, 4), ("none", True, 2), ("bool", False, 2),
                                                  ("additive", False, 4)])
@pytest.mark.parametrize("scaling", ["none", "delayed"])
def test_fused_matches_tiled(mask_kind, causal, hkv, scaling):
    q, k, v = (t.detach().to(DEVICE).requires_grad_() for t in _inputs(hkv=hkv, sq=40, skv=72))
    mask = _padding_mask(mask_kind, q.shape[0], q.shape[2], k.shape[2])
    mask = mask.to(DEVICE) if mask is not None else None
    (fused, pq_f), (tiled, pq_t) = (_steps(impl, q, k, v, mask, causal, scaling) for impl in ("fused", "tiled"))
    _agree(torch.float32, fused, tiled)
    for (name, want), got in zip(pq_t.named_buffers(), pq_f.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5 if "scale" not in name else 0, atol=0, msg=name)


def test_fused_current_scaling_bfloat16_and_track_stats():
    q, k, v = (t.detach().to(DEVICE).requires_grad_() for t in _inputs(sq=33, skv=50, dtype=torch.bfloat16))
    (fused, pq_f), (tiled, pq_t) = (_steps(impl, q, k, v, None, True, "current", track=True)
                                    for impl in ("fused", "tiled"))
    _agree(torch.bfloat16, fused, tiled)
    assert torch.equal(pq_f.scale, pq_t.scale)
    assert pq_f.last_stats.keys() == pq_t.last_stats.keys()
    for key, want in pq_t.last_stats.items():
        got = pq_f.last_stats[key]
        assert (got is None) == (want is None) and (want is None or abs(got - want) <= 1e-2 * max(abs(want), 1e-3)), key


def test_fused_refuses_other_p_formats():
    q, k, v = (t.detach().to(DEVICE) for t in _inputs())
    aq = _quantizers("mxfp4", "none", "fused").to(DEVICE)
    with pytest.raises(NotImplementedError, match="hif8 only"):
        quantized_attention(aq, q, k, v, None, 0.3, True)
