import pytest
import torch

import lpq
from lpq.config import from_dict
from lpq.formats import fake_quant
from lpq.models.adapters import get_adapter
from lpq.quant import (QuantExperts, QuantLinear, QuantRecipe, collect_stats, quant_enabled, set_quant_enabled,
                       set_stats_tracking)
from lpq.quant.attention import AttentionQuantizers
from tests.quant.tiny import LLMS, MODELS, LinearWeights, build, networks, run


def _recipe(family: str | None, **extra) -> QuantRecipe:
    return from_dict({"adapter": family, **extra}, QuantRecipe)


@pytest.mark.parametrize("fmt", ["hif8", "hif4", "mxfp4"])
@pytest.mark.parametrize("name", MODELS)
def test_every_targeted_weight_in_forward_is_on_the_format_grid(name, fmt):
    model, family = build(name)
    lpq.quantize_model(model, _recipe(family, format=fmt))
    for net in networks(model):
        expected, targeted, floats = [], [], []
        for m in net.modules():
            if isinstance(m, QuantLinear):
                expected.append(fake_quant(m.weight.detach(), fmt, -1))
                targeted.append(expected[-1])
            elif isinstance(m, QuantExperts):
                for w in (m.gate_up_proj, m.down_proj):
                    expected.extend(fake_quant(w.detach(), fmt, -1).unbind(0))
        quant_params = {id(p) for m in net.modules() if isinstance(m, (QuantLinear, QuantExperts))
                        for p in m.parameters()}
        floats = [p.detach() for p in net.parameters() if id(p) not in quant_params]
        assert targeted, "nothing was quantized"
        rec = LinearWeights()
        with rec, torch.no_grad():
            run(net)
        for w in rec.weights:
            on_grid = any(e.shape == w.shape and torch.equal(e, w) for e in expected)
            excluded = any(p.shape == w.shape and torch.equal(p, w) for p in floats)
            assert on_grid or excluded, f"a {tuple(w.shape)} weight used in forward is neither quantized nor excluded"
        for e in targeted:
            assert any(w.shape == e.shape and torch.equal(w, e) for w in rec.weights), "a QuantLinear was not used"


_FULL = dict(weight={"format": "hif8", "scaling": "current"}, input={"format": "hif8", "scaling": "delayed"},
             grad={"format": "hif8"}, attention={"format": "hif8", "p": {"format": "hif8", "scaling": "delayed"}})


@pytest.mark.parametrize("name", MODELS)
def test_disabled_quantization_is_bit_identical(name):
    model, family = build(name)
    refs = [run(net) for net in networks(model)]
    lpq.quantize_model(model, _recipe(family, **_FULL))
    outs = [run(net) for net in networks(model)]
    assert all(not torch.equal(o, r) for o, r in zip(outs, refs))
    set_quant_enabled(model, False)
    assert all(torch.equal(run(net), r) for net, r in zip(networks(model), refs))
    set_quant_enabled(model, True)
    with quant_enabled(model, False):
        assert all(torch.equal(run(net), r) for net, r in zip(networks(model), refs))
    assert all(m.quant_enabled for net in networks(model) for m in net.modules() if hasattr(m, "quant_enabled"))


def test_enable_per_block():
    model, _ = build("tiny-qwen3-moe")
    lpq.quantize_model(model, _recipe(None, **_FULL))
    set_quant_enabled(model, False)
    set_quant_enabled(model, True, blocks=[1])
    layers = model.model.layers
    kinds = (QuantLinear, QuantExperts, AttentionQuantizers)
    assert all(m.quant_enabled for m in layers[1].modules() if isinstance(m, kinds))
    assert not any(m.quant_enabled for m in layers[0].modules() if isinstance(m, kinds))
    assert any(isinstance(m, QuantExperts) for m in layers[1].modules())


@pytest.mark.parametrize("name", MODELS)
def test_gradients_flow_in_training(name):
    model, family = build(name)
    lpq.quantize_model(model, _recipe(family, **_FULL))
    for net in networks(model):
        net.train()
        run(net).square().mean().backward()
        quantized = [m for m in net.modules() if isinstance(m, (QuantLinear, QuantExperts))]
        assert quantized
        for m in quantized:
            for p in m.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0
        # the delayed quantizers recorded this step; the next forward folds it into their history
        run(net)
        delayed = [m for m in net.modules() if getattr(m, "amax_history", None) is not None and m.spec.scaling == "delayed"]
        assert delayed and all(bool((q.scale > 0).any()) for q in delayed)


def test_quantizing_twice_is_an_error():
    model, _ = build("tiny-llama")
    lpq.quantize_model(model, _recipe(None, format="hif8"))
    with pytest.raises(RuntimeError, match="already quantized"):
        lpq.quantize_model(model, _recipe(None, format="hif8"))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-wan22"])
def test_protected_and_excluded_modules_stay_float(name):
    model, family = build(name)
    exclude = ["*.mlp.down_proj"] if name in LLMS else ["*.ffn.net.2"]
    lpq.quantize_model(model, _recipe(family, format="hif4", protected_blocks=[0], exclude=exclude))
    for net in networks(model):
        blocks = get_adapter(model).blocks(net)
        assert not any(isinstance(m, QuantLinear) for m in blocks[0].modules())
        names = {n for n, m in blocks[1].named_modules() if isinstance(m, QuantLinear)}
        assert names and not any(n.endswith(exclude[0].split("*.")[1]) for n in names)


def test_protected_block_out_of_range():
    model, _ = build("tiny-llama")
    with pytest.raises(ValueError, match=r"protected_blocks \[7\] out of range: .* has 2 blocks"):
        lpq.quantize_model(model, _recipe(None, format="hif8", protected_blocks=[7]))


@pytest.mark.slow
def test_checkpoint_carries_scaling_state():
    model, _ = build("tiny-qwen3-moe")
    lpq.quantize_model(model, _recipe(None, **_FULL))
    model.train()
    for seed in range(3):
        run(model, seed)
    run(model, 3)
    state = model.state_dict()
    keys = [k for k in state if k.endswith("amax_history")]
    assert any(".mlp.experts." in k for k in keys) and any("lpq_attention.p_quantizer" in k for k in keys)
    fresh, _ = build("tiny-qwen3-moe")
    lpq.quantize_model(fresh, _recipe(None, **_FULL))
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    assert torch.equal(run(model, 9), run(fresh, 9))


def test_collect_stats_is_opt_in_and_names_each_quantizer():
    pipe, _ = build("tiny-wan22")
    lpq.quantize_model(pipe, _recipe(None, **_FULL))
    run(pipe.transformer)
    assert collect_stats(pipe) == {}
    set_stats_tracking(pipe, True)
    run(pipe.transformer)
    stats = collect_stats(pipe)
    assert "transformer.blocks.0.attn1.to_q.input_quantizer" in stats
    assert "transformer.blocks.1.attn2.lpq_attention.p_quantizer" in stats
    assert not any(k.startswith("transformer_2.") for k in stats)      # not run yet
    s = stats["transformer.blocks.0.ffn.net.2.weight_quantizer"]
    assert set(s) == {"amax", "scale", "overflow", "flushed", "coarse", "amax_vs_history"} and s["scale"] > 0
    assert s["amax_vs_history"] is None                      # current scaling keeps no history
    set_stats_tracking(pipe, False)
    assert collect_stats(pipe) == {}
