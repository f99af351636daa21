import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpq.formats import fake_quant
from lpq.quant import QuantizerSpec, QuantLinear

FORMATS = ["hif8", "hif4", "mxfp4"]


def _layer(fmt: str, bias: bool = True, grad: str | None = None, seed: int = 0) -> tuple[nn.Linear, QuantLinear]:
    torch.manual_seed(seed)
    lin = nn.Linear(96, 48, bias=bias)
    q = QuantLinear.from_linear(lin, weight_spec=QuantizerSpec(fmt), input_spec=QuantizerSpec(fmt),
                                grad_spec=QuantizerSpec(grad) if grad else None)
    return lin, q


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_output_equals_manual_fake_quant(fmt, bias):
    lin, q = _layer(fmt, bias)
    q.eval()
    x = torch.randn(3, 5, 96)
    expected = F.linear(fake_quant(x, fmt, -1), fake_quant(lin.weight, fmt, -1), lin.bias)
    assert torch.equal(q(x), expected)
    assert q.weight is lin.weight and q.bias is lin.bias
    assert set(q.state_dict()) == set(lin.state_dict())


def test_eval_caches_the_quantized_weight(monkeypatch):
    _, q = _layer("hif8")
    q.eval()
    calls = []
    original = q.weight_quantizer.forward
    monkeypatch.setattr(q.weight_quantizer, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(4, 96)
    y1, y2 = q(x), q(x)
    assert torch.equal(y1, y2) and len(calls) == 1
    with torch.no_grad():
        q.weight.mul_(2)            # an in-place write bumps the version: re-quantized
    q(x)
    assert len(calls) == 2
    q.weight.data.mul_(2)           # writes through .data are invisible: refresh() is needed
    q(x)
    assert len(calls) == 2
    q.refresh()
    assert torch.equal(q(x), F.linear(fake_quant(x, "hif8"), fake_quant(q.weight, "hif8"), q.bias))
    assert len(calls) == 3


@pytest.mark.parametrize("fmt", FORMATS)
def test_prequantized_weight_stays_bit_exact(fmt):
    lin, q = _layer(fmt)
    q.eval()
    w_q = fake_quant(lin.weight.detach() * 1.3, fmt, -1)     # e.g. GPTQ output, already on the grid
    q.set_quantized_weight(w_q)
    assert torch.equal(q.weight, w_q)
    assert torch.equal(q.quantized_weight(), w_q)
    x = torch.randn(2, 96)
    assert torch.equal(q(x), F.linear(fake_quant(x, fmt), w_q, q.bias))


@pytest.mark.parametrize("fmt,idempotent", [("hif8", True), ("mxfp4", True), ("hif4", False)])
def test_fake_quant_idempotence_per_format(fmt, idempotent):
    # Why set_quantized_weight exists: HiF4 re-derives its E6M2 scale from the (already rounded)
    # block maximum, so quantizing an on-grid weight again can move it.
    torch.manual_seed(0)
    w_q = fake_quant(torch.randn(64, 256), fmt, -1)
    assert torch.equal(fake_quant(w_q, fmt, -1), w_q) == idempotent


def test_disabled_is_exactly_nn_linear():
    lin, q = _layer("hif4")
    q.quant_enabled = False
    x = torch.randn(7, 96)
    assert torch.equal(q(x), lin(x))


def test_input_transform_runs_before_input_quantization():
    lin, q = _layer("hif8")
    q.eval()
    q.input_transform = lambda t: t.flip(-1)
    x = torch.randn(2, 96)
    expected = F.linear(fake_quant(x.flip(-1), "hif8"), fake_quant(lin.weight, "hif8"), lin.bias)
    assert torch.equal(q(x), expected)
    q.quant_enabled = False
    assert torch.equal(q(x), lin(x.flip(-1)))
    q.input_transform = nn.Identity()        # a module transform is registered as a submodule
    assert "input_transform" in dict(q.named_children())


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_gradients_are_straight_through(fmt):
    lin, q = _layer(fmt)
    q.train()
    x = torch.randn(4, 96, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    w_q = fake_quant(lin.weight.detach(), fmt)
    assert torch.equal(x.grad, g @ w_q)
    assert torch.equal(lin.weight.grad, g.t() @ fake_quant(x.detach(), fmt))
    assert lin.bias.grad is not None


def test_grad_role_quantizes_the_output_gradient():
    lin, q = _layer("hif8", grad="hif8")
    q.train()
    x = torch.randn(4, 96, requires_grad=True)
    g = torch.randn(4, 48) * 1e-3
    q(x).backward(g)
    g_q = fake_quant(g, "hif8")
    assert not torch.equal(g_q, g)
    assert torch.equal(x.grad, g_q @ fake_quant(lin.weight.detach(), "hif8"))
    assert torch.equal(lin.bias.grad, g_q.sum(0))
