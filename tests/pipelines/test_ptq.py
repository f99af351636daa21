"""The PTQ pipeline end to end on the tiny models (no downloads), resume, and recipe errors."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from lpq.algorithms.context import RunContext
from lpq.config import ConfigError, from_dict, load_config
from lpq.models.hub import ModelConfig, load_model
from lpq.pipelines import ptq
from lpq.pipelines.ptq_config import PTQConfig

CALIB_WORDS = " ".join(f"w{(i * 7919) % 990 + 4}" for i in range(600))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models run thousands of small ops; on shared, busy cores a second OpenMP thread only
    adds synchronization (several times slower measured), so these tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe(tmp_path: Path, model: str, algorithms: list[dict], **extra) -> dict:
    """The smallest settings that still exercise every step: 2 calibration sequences of 16 tokens,
    explicit protection (sensitivity runs only where a test asks for protect.auto), 1 eval window."""
    text = tmp_path / "calib.txt"
    text.write_text(CALIB_WORDS)
    d = {"model": {"id": model}, "quant": {"format": "hif4"},
         "calibration": {"text_file": str(text), "num_sequences": 2, "seq_len": 16, "batch_size": 2},
         "algorithms": algorithms, "protect": {"blocks": [1]},
         "evaluation": {"wikitext2": str(text), "windows": 1, "seq_len": 16}, "threads": 1}
    d.update(extra)
    return d


def _run(tmp_path: Path, d: dict, name: str = "out") -> dict:
    cfg = from_dict(d, PTQConfig)
    return ptq.run(cfg, tmp_path / name)


FULL = [{"name": "smoothquant", "alpha": 0.5}, {"name": "hadamard"}, {"name": "gptq", "act_order": True}]


# Sensitivity ranking (protect.auto) on one model only: it is the same code for every family.
@pytest.mark.parametrize("model,protect", [("tiny-llama", {"auto": 1, "sequences": 2, "seq_len": 8}),
                                           ("tiny-qwen3", {"blocks": [0]}), ("tiny-pangu", {"blocks": [1]}),
                                           ("tiny-qwen3-moe", {"blocks": [0]})])
def test_causal_lms_go_through_the_pipeline(tmp_path, model, protect):
    distill = {"name": "norm_distill", "steps": 2, "sequences": 2, "seq_len": 16, "batch_size": 1}
    report = _run(tmp_path, _recipe(tmp_path, model, FULL + [distill], protect=protect))
    assert report["norm_distill"]["parameters"] > 0
    for key in ("format", "model", "protected_blocks", "wall_s", "peak_rss_mb", "baseline", "quantized"):
        assert key in report
    assert len(report["protected_blocks"]) == 1
    q = report["quantized"]
    assert q["kl_div"] > 0 and 0 <= q["top1_agreement"] <= 1 and q["wikitext2_ppl"] > 1
    quantized = [b for b in report["blocks"] if not b["protected"]]
    assert quantized and all(b["rel_output_error"] > 0 for b in quantized)
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["format"] == "hif4"
    assert (out / "report.md").is_file() and (out / "sensitivity.png").is_file() == ("auto" in protect)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["id"] == model


def _logits_when_exported(monkeypatch, ids: torch.Tensor) -> dict:
    """{"runtime": the pipeline's model's logits on `ids`, taken just before it is exported}, once a run ends."""
    logits = {}
    real = ptq.export

    def spy(ctx, out_dir):
        with torch.no_grad():
            logits["runtime"] = ctx.loaded.model(ids).logits
        return real(ctx, out_dir)

    monkeypatch.setattr(ptq, "export", spy)
    return logits


def test_the_quantized_model_and_its_export_compute_the_same(tmp_path, monkeypatch):
    """The pipeline calibrates the runtime modules themselves (QuantLinear, InputTransform,
    set_quantized_weight): the model it ends with and the reloaded packed export give the same
    logits, bit for bit."""
    from lpq.export import load_quantized
    from lpq.quant import QuantLinear

    ids = torch.randint(4, 900, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = _logits_when_exported(monkeypatch, ids)
    report = _run(tmp_path, _recipe(tmp_path, "tiny-llama", [{"name": "rotate_residual"}] + FULL, evaluation=None))
    reloaded = load_quantized(report["export"]["path"])
    with torch.no_grad():
        logits["reloaded"] = reloaded(ids).logits
    assert torch.equal(logits["reloaded"], logits["runtime"])
    q_proj = reloaded.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.weight_prequantized
    # q/k/v smoothing is folded into the norm; o_proj's input has no producer to fold into: online.
    assert q_proj.input_transform.hadamard_block == 64 and q_proj.input_transform.input_scale is None
    assert reloaded.model.layers[0].self_attn.o_proj.input_transform.input_scale is not None
    assert reloaded.model.layers[1].self_attn.q_proj.weight_quantizer is None      # protected block


@pytest.mark.parametrize("model, flags", [("tiny-llama", {"attention_bias": True, "mlp_bias": True}),
                                          ("tiny-qwen3", {"attention_bias": True})])
def test_learned_biases_are_exported_for_the_model_class_and_its_loaders(tmp_path, monkeypatch, model, flags):
    """norm_distill.biases: every linear the model class can give a bias gets one (the config flags turned
    on, zeros in the protected block), the quantized ones are trained; the packed export computes what
    the runtime model does, and the fake-quantized export loads in stock transformers with every tensor."""
    import transformers

    from lpq.export import load_quantized

    ids = torch.randint(4, 900, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = _logits_when_exported(monkeypatch, ids)
    distill = {"name": "norm_distill", "steps": 3, "lr": 1e-2, "sequences": 2, "seq_len": 16, "batch_size": 1,
               "biases": True}
    report = _run(tmp_path, _recipe(tmp_path, model, [{"name": "hadamard"}, {"name": "rtn"}, distill],
                                    evaluation=None))
    reloaded = load_quantized(report["export"]["path"])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits["runtime"])
    assert {k: getattr(reloaded.config, k) for k in flags} == flags
    layers = reloaded.model.layers
    assert layers[0].self_attn.o_proj.bias.abs().sum() > 0                  # trained
    assert layers[1].self_attn.o_proj.bias.abs().sum() == 0                 # protected: present, zero
    assert (layers[0].mlp.down_proj.bias is not None) == ("mlp_bias" in flags)

    # A fake-quantized export holds float weights for stock classes, which run no online Hadamard.
    fake = dict(_recipe(tmp_path, model, [{"name": "rtn"}, distill], evaluation=None), export={"kind": "fake"})
    path = _run(tmp_path, fake, name="fake")["export"]["path"]
    stock, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info                                      # no missing / unexpected keys
    assert stock.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


def test_biases_for_a_family_whose_class_has_no_bias_flag_are_refused(tmp_path):
    distill = {"name": "norm_distill", "steps": 1, "sequences": 1, "seq_len": 8, "batch_size": 1, "biases": True}
    with pytest.raises(ValueError, match="norm_distill.biases: lpq knows no config flag that gives pangu linears"):
        _run(tmp_path, _recipe(tmp_path, "tiny-pangu", [{"name": "rtn"}, distill], evaluation=None,
                               quant={"format": "hif4", "adapter": "pangu"}))
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_hadamard_on_chosen_linears_only(tmp_path):
    """hadamard.linears: only matching linears are rotated (in the runtime transforms and the export
    too); a pattern that splits linears sharing one input is refused when smoothing needs them alike."""
    from lpq.export import load_quantized

    algos = [{"name": "hadamard", "linears": ["*down_proj", "*o_proj"]}, {"name": "gptq"}]
    report = _run(tmp_path, _recipe(tmp_path, "tiny-llama", algos, evaluation=None))
    layer = load_quantized(report["export"]["path"]).model.layers[0]
    assert layer.mlp.down_proj.input_transform.hadamard_block == 64
    assert layer.self_attn.o_proj.input_transform.hadamard_block == 64
    assert getattr(layer.self_attn.q_proj, "input_transform", None) is None
    split = [{"name": "smoothquant"}, {"name": "hadamard", "linears": ["*q_proj"]}, {"name": "rtn"}]
    with pytest.raises(ValueError, match="share one input but not one rotation"):
        _run(tmp_path, _recipe(tmp_path, "tiny-llama", split, evaluation=None, export=None), "split")


def test_hessians_are_taken_after_the_earlier_linears_of_the_block_are_quantized(tmp_path, monkeypatch):
    """Sequential within a block: o_proj's Hessian sees the output of the quantized q/k/v, and so on."""
    from lpq.algorithms import gptq
    from lpq.algorithms.context import BlockContext

    events = []
    real_inputs, real_q = BlockContext.linear_inputs, gptq.GPTQ.quantize_group

    def inputs(self, name):
        events.append(("H", name, all(lin.weight_prequantized for g in done for lin in g.linears)))
        return real_inputs(self, name)

    done = []

    def quantize(self, run, block, group):
        real_q(self, run, block, group)
        events.append(("Q", group.names[0], None))
        done.append(group)

    monkeypatch.setattr(BlockContext, "linear_inputs", inputs)
    monkeypatch.setattr(gptq.GPTQ, "quantize_group", quantize)
    _run(tmp_path, _recipe(tmp_path, "tiny-llama", [{"name": "gptq"}], evaluation=None, export=None))
    leaders = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]   # block 1 is protected
    assert [(k, n) for k, n, _ in events] == [(kind, n) for n in leaders for kind in ("H", "Q")]
    assert all(ok for k, _, ok in events if k == "H")


def test_quantization_changes_the_model_and_protection_keeps_blocks(tmp_path):
    d = _recipe(tmp_path, "tiny-llama", [{"name": "rtn"}], protect={"blocks": [1]})
    cfg = from_dict(d, PTQConfig)
    report = ptq.run(cfg, tmp_path / "out")
    assert report["protected_blocks"] == [1]
    assert report["quantized"]["kl_div"] > 0


def test_wan22_both_experts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3\nw4 w5\n")
    d = {"model": {"id": "tiny-wan22"}, "quant": {"format": "mxfp4"},
         "calibration": {"prompts": str(prompts), "num_prompts": 1, "timesteps": 2, "height": 16, "width": 16,
                         "num_frames": 5},
         "algorithms": [{"name": "hadamard"}, {"name": "gptq"}], "protect": {"blocks": [1, 3]}, "evaluation": None}
    report = _run(tmp_path, d)
    assert len(report["blocks"]) == 4            # 2 blocks in each expert
    assert report["protected_blocks"] == [1, 3]  # block 1 of each expert (global block indices)
    assert all(b["rel_output_error"] > 0 for b in report["blocks"] if not b["protected"])


def _final_state(out: Path) -> dict:
    return {k: v for i in range(2) for k, v in
            torch.load(out / "checkpoint" / f"block_{i:04d}.pt", weights_only=False)["state_dict"].items()}


@pytest.mark.parametrize("offloaded", [False, True])
def test_resume_after_a_kill_gives_the_identical_model(tmp_path, monkeypatch, offloaded):
    algorithms = [{"name": "hadamard"}, {"name": "gptq"}]
    if offloaded:   # residual rotation rewrites the whole model up front: not for offloaded weights
        model = _tiny_on_disk(tmp_path)[2]
    else:
        model, algorithms = "tiny-llama", [{"name": "rotate_residual", "seed": 1}] + algorithms
    d = _recipe(tmp_path, "tiny-llama", algorithms, evaluation=None, export=None, protect={"blocks": []})
    d["model"] = model if offloaded else {"id": model}
    _run(tmp_path, d, "straight")

    real = ptq.process_block
    calls = {"n": 0}

    def dies_on_second_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(ptq, "process_block", dies_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, d, "resumed")
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "meta.json").read_text())["next"] == 1
    monkeypatch.setattr(ptq, "process_block", real)
    report = _run(tmp_path, d, "resumed")
    assert report["resumed_from_block"] == 1
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_on_disk(tmp_path: Path) -> tuple[Path, int, dict]:
    """tiny-llama saved as a transformers folder; (folder, blocks, a model section that keeps block 0
    in memory and offloads the other blocks to disk)."""
    lm = load_model(ModelConfig(id="tiny-llama"))
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    n = lm.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(n)}}
    return folder, n, {"id": str(folder), "device_map": device_map, "offload_dir": str(tmp_path / "off")}


def test_disk_offloaded_blocks_give_the_same_model_one_block_at_a_time(tmp_path, monkeypatch):
    """accelerate device_map with blocks on disk: each block is loaded only while it is processed,
    and the quantized model, its evaluation and its export equal those of the in-memory run."""
    from safetensors.torch import load_file

    folder, n, offload = _tiny_on_disk(tmp_path)
    plain = _recipe(tmp_path, str(folder), FULL, protect={"auto": 1, "sequences": 2, "seq_len": 8})
    offloaded = dict(plain, model=offload)

    real, held = ptq.process_block, []

    def spy(run, block, steps):
        layers = run.stages[0].blocks
        held.append([i for i, b in enumerate(layers) if b.self_attn.q_proj.weight.device.type != "meta"])
        return real(run, block, steps)

    monkeypatch.setattr(ptq, "process_block", spy)
    r_off = _run(tmp_path, offloaded, "offloaded")
    monkeypatch.undo()
    r_plain = _run(tmp_path, plain, "plain")

    assert r_off["offloaded"] and not r_plain["offloaded"]
    assert held == [[0]] + [[0, i] for i in range(1, n)]        # block 0 sits on cpu; the rest one at a time
    assert r_off["protected_blocks"] == r_plain["protected_blocks"] and r_off["sensitivity"] == r_plain["sensitivity"]
    assert r_off["quantized"] == r_plain["quantized"] and r_off["baseline"] == r_plain["baseline"]
    a, b = (load_file(Path(r["export"]["path"]) / "lpq_packed.safetensors") for r in (r_off, r_plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ValueError, match="save it with save_pretrained"):
        load_model(ModelConfig(id="tiny-llama", device_map="auto"))
    with pytest.raises(ValueError, match="needs model.device_map"):
        load_model(ModelConfig(id=str(tmp_path), max_memory={"cpu": "1GiB"}))
    offload = _tiny_on_disk(tmp_path)[2]
    d = _recipe(tmp_path, "tiny-llama", [{"name": "rotate_residual"}, {"name": "rtn"}], evaluation=None, export=None)
    d["model"] = offload
    with pytest.raises(ValueError, match="rotate_residual rewrites every weight"):
        _run(tmp_path, d)
    d["algorithms"] = [{"name": "rtn"}, {"name": "norm_distill"}]
    with pytest.raises(ValueError, match="norm_distill trains through the whole model"):
        _run(tmp_path, d)


def test_norm_distillation_is_exported_and_survives_a_rerun(tmp_path, monkeypatch):
    """norm_distill trains the runtime model's norms after the blocks; the export holds them, and a rerun
    of the finished run takes them from the checkpoint instead of training again."""
    from lpq.algorithms import norm_distill
    from lpq.export import load_quantized

    steps = [{"name": "hadamard"}, {"name": "gptq"},
             {"name": "norm_distill", "steps": 3, "lr": 1e-2, "sequences": 2, "seq_len": 16, "batch_size": 1}]
    d = _recipe(tmp_path, "tiny-llama", steps)
    events = []
    real_load, real_release, real_kl = RunContext.float_model, RunContext.release_float_model, norm_distill.head_kl
    monkeypatch.setattr(RunContext, "float_model", lambda self: events.append("float model") or real_load(self))
    monkeypatch.setattr(RunContext, "release_float_model",
                        lambda self: events.append("released") or real_release(self))
    monkeypatch.setattr(norm_distill, "head_kl", lambda *a: events.append("step") or real_kl(*a))
    report = _run(tmp_path, d)
    # The float model is not held while the student trains: the distillation takes its targets, lets
    # it go, and the evaluation loads it again.
    assert events == ["float model", "released", "step", "step", "step", "float model"]
    monkeypatch.setattr(norm_distill, "head_kl", real_kl)
    assert report["norm_distill"]["steps"] == 3 and report["timings"]["norm_distill_s"] > 0
    assert "norm distillation: " in (tmp_path / "out" / "report.md").read_text()
    norms = norm_distill.norm_parameters(load_quantized(report["export"]["path"]))
    assert norms and any(not torch.equal(p, torch.ones_like(p)) for p in norms)   # tiny-llama's norms start at 1

    def no_training(*args):
        raise AssertionError("trained again")

    monkeypatch.setattr(norm_distill, "head_kl", no_training)
    events.clear()
    again = _run(tmp_path, d)
    assert "released" not in events   # the finished distillation did not load the float model for targets
    assert again["quantized"] == report["quantized"]
    assert {k: v for k, v in again["norm_distill"].items() if k != "seconds"} == \
        {k: v for k, v in report["norm_distill"].items() if k != "seconds"}
    norms_again = norm_distill.norm_parameters(load_quantized(again["export"]["path"]))
    assert all(torch.equal(a, b) for a, b in zip(norms, norms_again))
    # Another recipe in the same folder starts over, distillation included.
    d["algorithms"][1]["damp"] = 0.05
    with pytest.raises(AssertionError, match="trained again"):
        _run(tmp_path, d)


def test_recipe_errors_name_the_file_key_and_allowed_values(tmp_path):
    p = tmp_path / "r.yaml"
    d = _recipe(tmp_path, "tiny-llama", [{"name": "gptq", "alpha": 0.5}])
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"r\.yaml:\d+:.*no setting 'alpha'"):
        load_config(p, PTQConfig)
    d = _recipe(tmp_path, "tiny-llama", [{"name": "magic"}])
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="'rtn', 'scale_search'"):
        load_config(p, PTQConfig)
    d = _recipe(tmp_path, "tiny-llama", [{"name": "gptq"}], protect={"auto": 3})
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="budget"):
        load_config(p, PTQConfig)
    d = _recipe(tmp_path, "tiny-llama", [{"name": "hadamard"}])
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="exactly one weight quantizer"):
        load_config(p, PTQConfig)
    for steps, rule in (([{"name": "norm_distill"}, {"name": "gptq"}], "norm_distill must come after the weight "
                                                                        "quantizer gptq"),
                        ([{"name": "gptq"}, {"name": "hadamard"}], "hadamard must come before the weight quantizer "
                                                                   "gptq"),
                        ([{"name": "hadamard"}, {"name": "smoothquant"}, {"name": "rtn"}],
                         "list smoothquant before hadamard")):
        p.write_text(yaml.safe_dump(_recipe(tmp_path, "tiny-llama", steps)))
        with pytest.raises(ConfigError, match=rule):
            load_config(p, PTQConfig)
    p.write_text(yaml.safe_dump(_recipe(tmp_path, "tiny-llama", [{"name": "gptq"}, {"name": "norm_distill", "lr": 0}])))
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_config(p, PTQConfig)
    d = _recipe(tmp_path, "tiny-llama", [{"name": "hadamard"}, {"name": "rotate_residual"}, {"name": "gptq"}])
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="rotate_residual must come first"):
        load_config(p, PTQConfig)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml")))
def test_shipped_recipes_load(path):
    if path.name.startswith(("w4a4_", "ptq_")):
        load_config(path, PTQConfig)


def test_changing_only_a_refine_step_reuses_the_finished_blocks(tmp_path, monkeypatch):
    """The checkpoint's fingerprint covers the steps up to the weight quantizer: another distillation
    setting reruns only the distillation, whose progress file is keyed by its own settings."""
    steps = [{"name": "hadamard"}, {"name": "gptq"},
             {"name": "norm_distill", "steps": 2, "sequences": 2, "seq_len": 16, "batch_size": 1}]
    d = _recipe(tmp_path, "tiny-llama", steps, evaluation=None, export=None)
    first = _run(tmp_path, d)
    d["algorithms"][2]["lr"] = 3e-3
    calls = {"n": 0}
    real = ptq.process_block
    monkeypatch.setattr(ptq, "process_block", lambda *a: calls.__setitem__("n", calls["n"] + 1) or real(*a))
    second = _run(tmp_path, d)
    assert calls["n"] == 0 and second["resumed_from_block"] == 2
    assert second["norm_distill"]["first_loss"] == first["norm_distill"]["first_loss"]   # same blocks
    assert len(list((tmp_path / "out" / "checkpoint").glob("norm_distill-*.pt"))) == 2


def test_evaluation_on_text_domains(tmp_path):
    """Per-domain perplexity on the domains' validation parts, with paired CIs, in report.json,
    report.md and the printed summary; the float model's scores are cached between runs."""
    from lpq.data.domains import data_dir

    if not data_dir().is_dir():
        pytest.skip("shared data folder not found")
    ev = {"wikitext2": str(tmp_path / "calib.txt"), "windows": 2, "kl_windows": 1, "seq_len": 16,
          "domains": ["pydoc", "fortunes"], "domain_windows": 2}
    d = _recipe(tmp_path, "tiny-llama", [{"name": "rtn"}], evaluation=ev, export=None)
    report = _run(tmp_path, d)
    assert list(report["domains"]) == ["wikitext2_test", "pydoc", "fortunes"]
    for r in report["domains"].values():
        assert r["windows"] == 2 and r["ci95_low"] - 1e-9 <= r["ppl_increase_pct"] <= r["ci95_high"] + 1e-9
    assert report["quantized"]["wikitext2_ppl"] == report["domains"]["wikitext2_test"]["ppl"]
    assert "| pydoc | 2 |" in (tmp_path / "out" / "report.md").read_text()
    assert "| fortunes | 2 |" in ptq.summary(report)
    with pytest.raises(ConfigError, match="unknown domain 'code'"):
        from_dict(dict(d, evaluation=dict(ev, domains=["code"])), PTQConfig)


def test_float16_distillation_is_refused_before_any_work(tmp_path):
    steps = [{"name": "rtn"}, {"name": "norm_distill", "steps": 1, "sequences": 1, "seq_len": 8, "batch_size": 1}]
    d = _recipe(tmp_path, "tiny-llama", steps, evaluation=None, export=None)
    d["model"]["dtype"] = "float16"
    with pytest.raises(ValueError, match="float16 overflows"):
        _run(tmp_path, d)
    assert not (tmp_path / "out" / "checkpoint").exists()


@pytest.mark.parametrize("key", ["precision", "dtype"])
def test_bfloat16_distillation_on_a_cpu_that_emulates_it_is_refused_before_any_work(tmp_path, monkeypatch, key):
    """Emulated bfloat16 matmuls (no AVX512-BF16/AMX, or the pinned AVX2 numerics) are ~90x slower than
    float32: a distillation in bfloat16 there is refused in one line, naming the key; where they are
    native it runs."""
    from lpq import cpu_numerics

    steps = [{"name": "rtn"}, {"name": "norm_distill", "steps": 1, "sequences": 1, "seq_len": 8, "batch_size": 1}]
    d = _recipe(tmp_path, "tiny-llama", steps, evaluation=None, export=None)
    if key == "precision":
        steps[1]["precision"] = "bfloat16"
    else:
        d["model"]["dtype"] = "bfloat16"
    name = "norm_distill.precision" if key == "precision" else "model.dtype"
    monkeypatch.setattr(cpu_numerics, "native_bf16_matmul", lambda: False)
    with pytest.raises(ValueError, match=rf"in bfloat16 \({name}\), but bfloat16 matmuls are emulated"):
        _run(tmp_path, d)
    assert not (tmp_path / "out" / "checkpoint").exists()
    monkeypatch.setattr(cpu_numerics, "native_bf16_matmul", lambda: True)
    assert _run(tmp_path, d)["norm_distill"]["steps"] == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # the dropped Ctrl-C itself
def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, monkeypatch):
    """Python drops an exception raised inside __del__; a Ctrl-C landing there as a block finishes
    (objects are freed then) must still stop the run at the next checkpoint."""
    import gc
    import os
    import signal

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)   # the handler raises here, inside __del__: dropped

    real = ptq.process_block

    def block_then_free(*args):
        out = real(*args)
        Finalized()
        gc.collect()
        return out

    monkeypatch.setattr(ptq, "process_block", block_then_free)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, _recipe(tmp_path, "tiny-llama", [{"name": "rtn"}], evaluation=None, export=None))
    meta = json.loads((tmp_path / "out" / "checkpoint" / "meta.json").read_text())
    assert meta["next"] == 1                        # stopped after the first block, which was saved


def test_two_runs_of_the_command_give_identical_exports(tmp_path):
    """The same recipe, bit for bit: two `lpq ptq` processes (pinned CPU numerics, two threads, a
    sensitivity ranking and a distillation that amplify any last-bit difference) write identical
    checkpoints."""
    import hashlib
    import subprocess
    import sys

    d = _recipe(tmp_path, "tiny-qwen3", [{"name": "smoothquant"}, {"name": "hadamard"}, {"name": "gptq"},
                                         {"name": "norm_distill", "steps": 3, "sequences": 2, "seq_len": 16,
                                          "batch_size": 1}],
                protect={"auto": 1, "sequences": 2, "seq_len": 8}, evaluation=None, threads=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(d))
    digests = []
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "lpq.cli", "ptq", "--config", str(recipe), "--out", str(tmp_path / name)],
                       check=True, capture_output=True)
        files = sorted((tmp_path / name / "quantized").glob("*.safetensors"))
        digests.append([hashlib.sha256(f.read_bytes()).hexdigest() for f in files])
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["cpu_numerics"]["ATEN_CPU_CAPABILITY"] == "avx2" and report["cpu_numerics"]["threads"] == 2
    assert digests[0] and digests[0] == digests[1]


@pytest.mark.parametrize("change,message", [
    ({"protect": {"blocks": [7]}}, "block 7 is out of range: tiny-llama has 2 blocks"),   # KeyedError: the command names the key
    ({"protect": {"blocks": None, "auto": 1, "sequences": 0}}, "protect needs sequences >= 1"),
    ({"calibration": {"seq_len": 300}}, "calibration.seq_len: 300 tokens is beyond tiny-llama's context of 256"),
    ({"calibration": {"num_sequences": 60}}, "holds 37 windows of 16 tokens .* fewer than the 60 asked for"),
    ({"skip_linears": ["mlp.no_such_proj"]}, "pattern '\\*.mlp.no_such_proj' matches no module"),
    ({"evaluation": {"wikitext2": "/nonexistent/test.txt"}}, "evaluation.wikitext2: /nonexistent/test.txt not found"),
    ({"evaluation": {"windows": 0, "domain_eval": {"domains": ["gsm8k"], "windows": 1, "seq_len": 300}}},
     "evaluation.domain_eval.seq_len: 300 tokens is beyond tiny-llama's context of 256"),
    # data read only after the last block (the evaluation, the distillation) is checked before the first
    ({"evaluation": {"windows": 0, "domain_eval": {"domains": ["gsm8k"], "windows": 100000, "seq_len": 16}}},
     r"domain 'gsm8k' \(validation\) has \d+ tokens, fewer than 100000 windows of 16"),
    ({"algorithms": [{"name": "rtn"}, {"name": "norm_distill", "steps": 1, "sequences": 500, "seq_len": 16}]},
     r"norm_distill \(sequences 500, seq_len 16\): the calibration text holds \d+ windows of 16 tokens"),
])
def test_bad_values_are_refused_before_the_blocks(tmp_path, monkeypatch, change, message):
    """Ranges, lengths, patterns and files are checked before any block is quantized, with the key."""
    d = _recipe(tmp_path, "tiny-llama", [{"name": "rtn"}], export=None)
    for section, value in change.items():
        d[section] = {**d[section], **value} if isinstance(d.get(section), dict) else value
    monkeypatch.setattr(ptq, "process_block", lambda *a: pytest.fail("a block was quantized"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        cfg = from_dict(d, PTQConfig)
        ptq.validate_inputs(cfg)
        ptq.run(cfg, tmp_path / "out")


def test_no_wikitext2_windows_means_no_check_of_their_length(tmp_path):
    d = _recipe(tmp_path, "tiny-llama", [{"name": "rtn"}], export=None,
                evaluation={"windows": 0, "seq_len": 512, "wikitext2": "/nonexistent/test.txt"})
    ptq.validate_inputs(from_dict(d, PTQConfig))          # neither the length nor the file is read


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    d = _recipe(tmp_path, "tiny-llama", [{"name": "rtn"}], evaluation=None, export=None)
    _run(tmp_path, d)
    (tmp_path / "out" / "checkpoint" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"meta\.json is damaged \(JSONDecodeError.*delete .*checkpoint to start"):
        _run(tmp_path, d)
    (tmp_path / "out" / "checkpoint" / "meta.json").unlink()
    _run(tmp_path, d)
    (tmp_path / "out" / "checkpoint" / "block_0000.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"block_0000\.pt is damaged"):
        _run(tmp_path, d)
