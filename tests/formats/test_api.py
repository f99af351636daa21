"""Dispatcher behaviour shared by every format: empty tensors, backends, 0-d tensors, the STE."""
import pytest
import torch

from lpq.formats import FORMATS, decode, encode, fake_quant, fake_quant_ste


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("axis", [0, 1])
def test_empty_tensors_round_trip(fmt, axis):
    x = torch.empty(0, 5)
    assert fake_quant(x, fmt, axis).shape == (0, 5)
    assert decode(encode(x, fmt, axis)).shape == (0, 5)


@pytest.mark.parametrize("fmt", ["hif8", "hif4", "mxfp4"])
def test_zero_dim_tensor(fmt):
    x = torch.tensor(3.3)
    y = fake_quant(x, fmt)
    assert y.shape == () and torch.equal(decode(encode(x, fmt)), y)


def test_backend_argument_and_env(monkeypatch):
    x = torch.randn(3, 70)
    assert torch.equal(fake_quant(x, "hif4", backend="ref"), fake_quant(x, "hif4", backend="cpp"))
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid: auto, cpp, ref"):
        fake_quant(x, "hif4", backend="gpu")
    monkeypatch.setenv("LPQ_BACKEND", "nope")
    with pytest.raises(ValueError, match="LPQ_BACKEND"):
        fake_quant(x, "hif4")


def test_straight_through_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    y = fake_quant_ste(x, "hif4")
    assert torch.equal(y.detach(), fake_quant(x.detach(), "hif4"))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
