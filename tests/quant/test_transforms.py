"""InputTransform math and state, set_input_transform, and pre-quantized weights that survive moves."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpq.algorithms.hadamard import fwht, hadamard_matrix
from lpq.formats import fake_quant
from lpq.quant import InputTransform, QuantizerSpec, QuantLinear, QuantRecipe, quantize_model, set_input_transform


def _scale(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 3 + 0.25


def _layer(fmt: str = "hif4", in_features: int = 96) -> QuantLinear:
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 48)
    return QuantLinear.from_linear(lin, weight_spec=QuantizerSpec(fmt), input_spec=QuantizerSpec(fmt)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_is_scale_division_then_block_hadamard(dtype):
    x = torch.randn(3, 5, 96).to(dtype)                  # 96 = a 64-block then a 32-block
    s = _scale(96)
    t = InputTransform(64, s)
    assert torch.equal(t(x), fwht(x / s.to(dtype), 64))
    assert torch.equal(InputTransform(64)(x), fwht(x, 64))
    assert torch.equal(InputTransform(input_scale=s)(x), x / s.to(dtype))
    if dtype == torch.float32:
        assert torch.allclose(t(x), (x / s) @ hadamard_matrix(96, 64), atol=1e-5)


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        InputTransform(48)
    with pytest.raises(ValueError, match="needs a hadamard_block, an input_scale, or both"):
        InputTransform()


def test_quant_linear_applies_the_transform_before_input_quantization():
    q = _layer()
    s = _scale(96)
    q.input_transform = InputTransform(64, s)
    x = torch.randn(4, 96)
    xt = fwht(x / s, 64)
    assert torch.equal(q(x), F.linear(fake_quant(xt, "hif4"), fake_quant(q.weight, "hif4"), q.bias))
    q.quant_enabled = False
    assert torch.equal(q(x), F.linear(xt, q.weight, q.bias))


def test_state_dict_round_trip():
    q = _layer()
    q.input_transform = InputTransform(64, _scale(96))
    state = q.state_dict()
    assert set(state) == {"weight", "bias", "input_transform.input_scale"}
    other = QuantLinear.from_linear(nn.Linear(96, 48), weight_spec=QuantizerSpec("hif4"),
                                    input_spec=QuantizerSpec("hif4")).eval()
    other.input_transform = InputTransform(64, torch.ones(96))
    other.load_state_dict(state)
    x = torch.randn(4, 96)
    assert torch.equal(other(x), q(x))


def test_set_input_transform_wraps_a_plain_linear_without_quantizing_it():
    from lpq.models.tiny import tiny_causal_lm

    model = tiny_causal_lm("tiny-llama")
    quantize_model(model, QuantRecipe(format="hif4", protected_blocks=[1]))
    lin = model.model.layers[1].mlp.down_proj
    assert type(lin) is nn.Linear                                     # protected
    s = _scale(128)
    q = set_input_transform(model, "model.layers.1.mlp.down_proj", InputTransform(64, s))
    assert model.model.layers[1].mlp.down_proj is q and q.weight is lin.weight
    assert q.weight_quantizer is None and q.input_quantizer is None
    x = torch.randn(2, 128)
    assert torch.equal(q(x), lin(fwht(x / s, 64)))
    assert set(q.state_dict()) == {"weight", "input_transform.input_scale"}
    with pytest.raises(TypeError, match="input transforms go on linears"):
        set_input_transform(model, "model.layers.1.mlp", InputTransform(64))


def _off_grid_again(w: torch.Tensor) -> torch.Tensor:
    """A GPTQ-like HiF4 weight: on the grid, but quantizing it again moves it."""
    g = torch.Generator().manual_seed(2)
    w_q = fake_quant(w.detach() * 1.1 + 0.01 * torch.randn(w.shape, generator=g), "hif4")
    assert not torch.equal(fake_quant(w_q, "hif4"), w_q)      # else this test could not fail
    return w_q


@pytest.mark.parametrize("move", ["to_cpu", "to_float32", "float64_and_back", "deepcopy"])
def test_prequantized_hif4_weight_survives_moves(move):
    q = _layer()
    w_q = _off_grid_again(q.weight)
    q.set_quantized_weight(w_q)
    moved = {"to_cpu": lambda m: m.to("cpu"), "to_float32": lambda m: m.to(torch.float32),
             "float64_and_back": lambda m: m.to(torch.float64).to(torch.float32),   # new storage, as a device move
             "deepcopy": copy.deepcopy}[move](q)
    assert moved.weight_prequantized
    assert torch.equal(moved.quantized_weight(), w_q)
    x = torch.randn(3, 96)
    assert torch.equal(moved(x), F.linear(fake_quant(x, "hif4"), w_q, moved.bias))


def test_training_the_weight_clears_the_prequantized_flag():
    q = _layer()
    q.set_quantized_weight(_off_grid_again(q.weight))
    q.train()
    with torch.no_grad():
        q(torch.randn(2, 96))                   # no gradient: the weight cannot change
    assert q.weight_prequantized
    q(torch.randn(2, 96)).sum().backward()
    assert not q.weight_prequantized
    q.eval()
    assert torch.equal(q.quantized_weight(), fake_quant(q.weight, "hif4"))


def test_experts_prequantized_weight_survives_deepcopy():
    from lpq.models.tiny import tiny_causal_lm

    model = tiny_causal_lm("tiny-qwen3-moe")
    quantize_model(model, QuantRecipe(format="hif4"))
    experts = model.model.layers[0].mlp.experts
    w_q = _off_grid_again(experts.down_proj)
    experts.set_quantized_weight("down_proj", w_q)
    assert experts.weight_prequantized == {"gate_up_proj": False, "down_proj": True}
    copied = copy.deepcopy(experts).to(torch.float64).to(torch.float32)
    assert torch.equal(copied.quantized_weight("down_proj"), w_q)
    assert torch.equal(copied.quantized_weight("gate_up_proj"), fake_quant(experts.gate_up_proj, "hif4"))
    with pytest.raises(ValueError, match="expected"):
        experts.set_quantized_weight("down_proj", w_q[:1])
    with pytest.raises(ValueError, match="'gate_up_proj' and 'down_proj'"):
        experts.set_quantized_weight("up_proj", w_q)
