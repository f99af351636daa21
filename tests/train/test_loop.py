import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lpq.models.hub as hub
from lpq.train.compare import REPORT, run_training
from lpq.train.monitor import read_jsonl
from lpq.train.nonfinite import NonFiniteError
from tests.train.helpers import make_recipe


def test_hif8_and_reference_runs_report(corpus, tmp_path):
    recipe = make_recipe(corpus, tmp_path, steps=6, bf16_warmup_steps=2)
    report = run_training(recipe)
    saved = json.loads((tmp_path / REPORT).read_text())
    assert saved == report
    for key in ("steps", "scaling", "eval_loss_bf16", "eval_loss_hif8", "rel_diff_pct", "step_time_ratio"):
        assert report[key] is not None, key
    assert report["steps"] == 6 and report["scaling"] == "delayed"
    assert report["eval_loss_bf16"] < report["eval_loss_bf16_before_training"]
    assert report["within_0.5pct"] == (report["rel_diff_pct"] < 0.5)
    assert report["rel_diff_pct"] == pytest.approx(
        100 * (report["eval_loss_hif8"] - report["eval_loss_bf16"]) / report["eval_loss_bf16"])
    # Identical until HiF8 turns on after the 2 warm-up steps, different from then on.
    assert report["first_step_losses_differ"] == 3
    bf16 = read_jsonl(tmp_path / "bf16" / "metrics.jsonl")
    hif8 = read_jsonl(tmp_path / "hif8" / "metrics.jsonl")
    assert [r["step"] for r in hif8] == list(range(1, 7))
    assert [r["quant_on"] for r in hif8] == [False, False, True, True, True, True]
    assert bf16[-1]["loss"] < bf16[0]["loss"] and hif8[-1]["loss"] < hif8[0]["loss"]
    # Quantizer traces: stats at the first quantized step and every 2 steps, all fractions present.
    stats = read_jsonl(tmp_path / "hif8" / "quant_stats.jsonl")
    assert [r["step"] for r in stats] == [3, 4, 6]
    q = stats[-1]["quantizers"]
    assert any(name.endswith("mlp.down_proj.input_quantizer") for name in q)
    assert any(name.endswith("lpq_attention.p_quantizer") for name in q)
    for s in q.values():
        assert {"amax", "scale", "overflow", "flushed", "coarse"} <= set(s)
        assert 0 <= s["overflow"] <= 1 and 0 <= s["flushed"] <= 1 and s["scale"] > 0
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "hif8" / "quant_stats.png").stat().st_size > 0
    assert (tmp_path / "hif8" / "final" / "model.safetensors").is_file()


def _interrupt_after(step):
    def cb(done, loss):
        if done == step:
            raise KeyboardInterrupt
    return cb


def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(corpus, tmp_path):
    common = dict(steps=7, bf16_warmup_steps=2, checkpoint_every=3, grad_accum=2, reference_run=False)
    full = run_training(make_recipe(corpus, tmp_path / "full", **common))
    with pytest.raises(KeyboardInterrupt):   # killed after step 5; the last checkpoint is at step 3
        run_training(make_recipe(corpus, tmp_path / "cut", **common), on_step=_interrupt_after(5))
    resumed = run_training(make_recipe(corpus, tmp_path / "cut", **common))
    a = read_jsonl(tmp_path / "full" / "hif8" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "cut" / "hif8" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 8))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]       # bit-identical, not approximately
    assert resumed["eval_loss_hif8"] == full["eval_loss_hif8"]
    assert resumed["eval_loss_hif8_before_training"] == full["eval_loss_hif8_before_training"]
    wa = load_file(str(tmp_path / "full" / "hif8" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "hif8" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert any(k.endswith("input_quantizer.amax_history") for k in wa)   # scaling state is checkpointed
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _patched_loader(monkeypatch, edit):
    original = hub.load_model

    def load(cfg):
        loaded = original(cfg)
        with torch.no_grad():
            edit(loaded.model)
        return loaded
    monkeypatch.setattr(hub, "load_model", load)


def test_nan_parameter_is_named(corpus, tmp_path, monkeypatch):
    _patched_loader(monkeypatch, lambda m: m.model.layers[1].mlp.down_proj.weight[0, 0].fill_(math.nan))
    recipe = make_recipe(corpus, tmp_path, steps=3, bf16_warmup_steps=0, reference_run=True)
    with pytest.raises(NonFiniteError, match=r"step 1; .*parameter model\.layers\.1\.mlp\.down_proj\.weight"):
        run_training(recipe, only="bf16")
    assert "down_proj" in (tmp_path / "bf16" / "nonfinite.txt").read_text()


def test_hif8_overflow_to_inf_names_the_quantizer(corpus, tmp_path, monkeypatch):
    # Inputs of down_proj far beyond 40960 with no scaling: HiF8 turns them into Inf.
    _patched_loader(monkeypatch, lambda m: m.model.layers[0].mlp.up_proj.weight.mul_(1e6))
    quant = {"input": {"format": "hif8", "scaling": "none"}}
    recipe = make_recipe(corpus, tmp_path, quant=quant, steps=3, bf16_warmup_steps=0, reference_run=False)
    where = r"output of model\.layers\.0\.mlp\.down_proj\.input_quantizer \(TensorQuantizer\) holds inf"
    with pytest.raises(NonFiniteError, match=r"step 1; .*" + where):
        run_training(recipe)


def test_delayed_scaling_is_all_that_keeps_the_overflow_away(corpus, tmp_path, monkeypatch):
    # The same model trains with delayed scaling: the scale brings the activations below 40960.
    _patched_loader(monkeypatch, lambda m: m.model.layers[0].mlp.up_proj.weight.mul_(1e6))
    quant = {"input": {"format": "hif8", "scaling": "delayed", "history_len": 4}}
    recipe = make_recipe(corpus, tmp_path, quant=quant, steps=2, bf16_warmup_steps=0, reference_run=False,
                         lr=1e-6)
    report = run_training(recipe)
    assert math.isfinite(report["eval_loss_hif8"])


def test_trained_hif8_model_is_exported_and_reloads_bit_exactly(corpus, tmp_path):
    from lpq.config import from_dict, to_dict
    from lpq.export import load_quantized
    from lpq.quant import QuantRecipe, quantize_model
    from lpq.train.recipe import TrainRecipe

    data = to_dict(make_recipe(corpus, tmp_path, steps=3, bf16_warmup_steps=1, reference_run=False))
    data["export"] = {"kind": "packed"}
    run_training(from_dict(data, TrainRecipe))
    reloaded = load_quantized(tmp_path / "hif8" / "export")
    # The trained model: its weights and delayed-scaling buffers from final/, under the same recipe.
    trained = hub.load_model(hub.ModelConfig(id="tiny-llama")).model
    quantize_model(trained, from_dict(data["quant"], QuantRecipe))
    trained.load_state_dict(load_file(str(tmp_path / "hif8" / "final" / "model.safetensors")))
    trained.eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_lpq_eval_runs_on_both_trained_models(corpus, tmp_path):
    from lpq.config import from_dict, to_dict
    from lpq.eval.shift import distribution_shift
    from lpq.train.recipe import TrainRecipe

    text = " ".join(json.loads(line)["text"] for line in corpus.read_text().splitlines())
    (tmp_path / "held_out.txt").write_text(text)
    data = to_dict(make_recipe(corpus, tmp_path, steps=3, bf16_warmup_steps=1))
    data["eval"] = {"tasks": [], "kl": True, "kl_text": str(tmp_path / "held_out.txt"), "kl_windows": 2,
                    "kl_seq_len": 32, "bootstrap": 100}
    report = run_training(from_dict(data, TrainRecipe))
    shift = report["eval"]["distribution_shift"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["distribution_shift"]["kl_div"] == \
        shift["kl_div"]
    assert shift["kl_div"] > 0 and 0 < shift["top1_agreement"] <= 1
    # The figures are those of the saved models: BF16-trained weights, and HiF8-trained ones with HiF8 on.
    bf16 = hub.load_model(hub.ModelConfig(id=str(tmp_path / "bf16" / "final"))).model
    again = distribution_shift(bf16, bf16, hub.load_model(hub.ModelConfig(id="tiny-llama")).tokenizer, text, 2, 32)
    assert again["baseline_ppl"] == pytest.approx(shift["baseline_ppl"], rel=1e-5)
    assert shift["candidate_ppl"] != shift["baseline_ppl"]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(monkeypatch, native):
    """Emulated bfloat16 matmuls (no AVX512-BF16/AMX, or the pinned numerics) are ~90x slower than float32:
    a CPU run in bf16 is told so in one line before it trains; float32 runs and native bf16 are not."""
    from lpq import cpu_numerics
    from lpq.train.loop import emulated_bf16_warning
    from lpq.train.recipe import MixedPrecision, TrainConfig

    if torch.cuda.is_available():
        pytest.skip("the warning is for CPU runs")
    monkeypatch.setattr(cpu_numerics, "native_bf16_matmul", lambda: native)
    warning = emulated_bf16_warning(TrainConfig(mixed_precision=MixedPrecision.BF16))
    assert (warning is None) == native
    assert native or warning.startswith("train.mixed_precision bf16 on a CPU whose bfloat16 matmuls are emulated")
    assert emulated_bf16_warning(TrainConfig(mixed_precision=MixedPrecision.NO)) is None
