"""`lpq train` comparing several runs: the reference and one QAT run per scaling mode in one command,
run labels that follow the recipe's formats, the per-domain evaluation and the stability figures."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from lpq.cli import app
from lpq.config import ConfigError, from_dict, load_config, to_dict
from lpq.train.compare import REPORT, describe, plan_runs, quant_for_mode, scaling_by_role, stability
from lpq.train.domains import compare_domains, domain_text
from lpq.train.recipe import Split, TrainRecipe
from tests.train.helpers import make_recipe, quant_section


def _domain_data(root):
    """Tiny stand-ins for the shared data folder, in tiny-llama's word vocabulary."""
    (root / "wikitext2").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    (root / "calib").mkdir()
    words = " ".join(f"w{(i * 13) % 40}" for i in range(400))
    (root / "wikitext2" / "test.txt").write_text(words)
    (root / "wikitext2" / "valid.txt").write_text(words[::-1])
    (root / "gsm8k" / "train.jsonl").write_text("".join(
        json.dumps({"question": f"w{i} w{i + 1} w3 w4 w5", "answer": f"w{i % 7} w9 w{i % 5} w8"}) + "\n"
        for i in range(80)))
    (root / "calib" / "fortunes_calib.txt").write_text(" ".join(f"w{(i * 7) % 30}" for i in range(600)))
    return root


def test_reference_current_and_delayed_runs_in_one_command(corpus, tmp_path):
    data = to_dict(make_recipe(corpus, tmp_path / "out", steps=4, bf16_warmup_steps=1, stats_every=1,
                               compare=["current", "delayed"]))
    data["domain_eval"] = {"domains": ["wikitext2", "gsm8k", "fortunes"], "windows": 3, "seq_len": 16,
                           "data_dir": str(_domain_data(tmp_path / "data")), "bootstrap": 200}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert list(report["runs"]) == ["bf16", "hif8_current", "hif8_delayed"] and report["reference"] == "bf16"
    ref = report["runs"]["bf16"]
    assert not ref["quantized"] and "rel_diff_pct" not in ref
    for mode in ("current", "delayed"):
        run = report["runs"][f"hif8_{mode}"]
        assert run["scaling"] == mode and run["scaling_by_role"]["input"].startswith(f"hif8 {mode}")
        assert run["scaling_by_role"]["weight"].startswith(f"hif8 {mode}")
        assert run["first_step_losses_differ"] == 2                               # same seed and data
        assert run["rel_diff_pct"] == pytest.approx(100 * (run["eval_loss"] - ref["eval_loss"]) / ref["eval_loss"])
        assert run["step_time_ratio"] > 0
        assert set(run["domains"]) == {"wikitext2", "gsm8k", "fortunes", "train_heldout"}
        for d in run["domains"].values():
            assert d["ci95_low"] <= d["ppl_increase_pct"] <= d["ci95_high"] and d["ppl_reference"] > 0
        st = run["stability"]
        assert [p["step"] for p in st["over_time"]] == [2, 3, 4]
        assert set(st["p_flushed_by_block_last"]) == {"0", "1"}
        assert 0 <= st["max_flushed"] <= 1 and st["max_overflow"] == 0
        assert f"HiF8 QAT, {mode} scaling" in res.output
    # The lag of delayed scaling behind the tensor is traced; current scaling has no history to lag.
    assert report["runs"]["hif8_delayed"]["stability"]["max_amax_vs_history"] > 0
    assert report["runs"]["hif8_current"]["stability"]["max_amax_vs_history"] is None
    # Same reference, same in-domain windows: the per-domain reference perplexities agree across runs.
    a, b = (report["runs"][f"hif8_{m}"]["domains"]["wikitext2"]["ppl_reference"] for m in ("current", "delayed"))
    assert a == b
    assert "rel_diff_pct" not in report             # no single quantized run: no flat figures
    assert report["eval_loss_hif8_delayed"] == report["runs"]["hif8_delayed"]["eval_loss"]
    for png in ("loss_curves.png", "stability.png", "hif8_delayed/quant_stats.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0
    # A rerun resumes every run at its last step and reuses the stored domain scores.
    again = CliRunner().invoke(app, ["train", "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out" / REPORT).read_text())["runs"] == report["runs"]


def test_labels_follow_the_recipe_format(corpus, tmp_path):
    # A HiF4 recipe trains HiF4 and says so: folder, report keys, summary (issue 15, point 5).
    quant = {"weight": {"format": "hif4"}, "input": {"format": "hif4"}}
    recipe = make_recipe(corpus, tmp_path, quant=quant, steps=2, bf16_warmup_steps=1, stats_every=1)
    from lpq.train.compare import run_training

    report = run_training(recipe)
    assert list(report["runs"]) == ["bf16", "hif4"] and (tmp_path / "hif4" / "final").is_dir()
    assert not (tmp_path / "hif8").exists()
    assert report["runs"]["hif4"]["format"] == "hif4" and "eval_loss_hif4" in report
    assert not any("hif8" in k for k in report)
    text = describe(report)
    assert "HiF4 QAT" in text and "HiF8" not in text and "(hif4 - bf16) / bf16" in text


def test_plan_runs_and_mode_switch():
    recipe = from_dict({"quant": quant_section("delayed"), "train": {"compare": ["delayed", "current"]}}, TrainRecipe)
    assert [p.label for p in plan_runs(recipe)] == ["bf16", "hif8_delayed", "hif8_current"]
    q = quant_for_mode(recipe.quant, "current")
    assert {s.scaling.value for s in (q.weight, q.input, q.grad, q.attention.q, q.attention.p)} == {"current"}
    assert q.input.history_len == recipe.quant.input.history_len and q.attention.v.axis == -2
    none = from_dict({"quant": {"format": "hif4"}, "train": {"mixed_precision": "no", "compare": ["current"]}},
                     TrainRecipe)
    plans = plan_runs(none)
    assert [p.label for p in plans] == ["fp32", "hif4_current"]
    assert plans[1].quant.input.scaling.value == "none"     # block scales only: nothing to switch
    mixed = from_dict({"quant": {"weight": {"format": "hif8"}, "input": {"format": "mxfp4"}}}, TrainRecipe)
    assert [p.label for p in plan_runs(mixed)] == ["bf16", "hif8+mxfp4"]
    assert plan_runs(mixed)[1].title.startswith("HiF8+MXFP4 QAT")


def test_mode_switch_keeps_the_qk_rotation_and_the_report_names_it():
    section = quant_section("delayed")
    section["attention"]["qk_rotation"] = "hadamard"
    recipe = from_dict({"quant": section, "train": {"compare": ["current"]}}, TrainRecipe)
    quant = plan_runs(recipe)[1].quant
    assert quant.attention.qk_rotation.value == "hadamard"
    roles = scaling_by_role(quant)
    assert roles["attention.q"].endswith("rows rotated (hadamard)") and roles["attention.k"].endswith("(hadamard)")
    assert "rotated" not in roles["attention.v"] + roles["input"]
    plain = plan_runs(from_dict({"quant": quant_section("delayed")}, TrainRecipe))[1].quant
    assert "rotated" not in scaling_by_role(plain)["attention.q"]


@pytest.mark.parametrize("text, match", [
    ("train: {compare: [current, sometimes]}\nquant: {format: hif8}\n",
     r"'train.compare\[1\]': 'sometimes' is not allowed; use one of 'current', 'delayed'"),
    ("train: {compare: [current, current]}\nquant: {format: hif8}\n", "lists a mode twice"),
    ("train: {compare: [current]}\n", "train.compare needs a `quant:` section"),
    ("domain_eval: {domains: [wikitext2, news]}\n", "unknown domain 'news'"),
    ("domain_eval: {windows: 0}\n", "windows must be >= 1"),
    ("data: {kind: wan_latents, cache_dir: x}\ndomain_eval: {}\n", "domain_eval scores text domains"),
])
def test_bad_compare_and_domain_settings_are_named(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, TrainRecipe)


def test_missing_domain_data_is_named_before_training(corpus, tmp_path):
    data = to_dict(make_recipe(corpus, tmp_path / "out"))
    from lpq.train.compare import run_training

    data["domain_eval"] = {"data_dir": str(tmp_path / "nowhere")}
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        run_training(from_dict(data, TrainRecipe))
    (tmp_path / "empty").mkdir()
    data["domain_eval"] = {"data_dir": str(tmp_path / "empty")}
    with pytest.raises(FileNotFoundError, match="'wikitext2' needs .*wikitext2/test.txt"):
        run_training(from_dict(data, TrainRecipe))
    assert not (tmp_path / "out" / "bf16").exists()


@pytest.mark.parametrize("case", ["unknown run label", "missing domain data"])
def test_the_command_checks_runs_and_data_before_it_makes_the_output_folder(corpus, tmp_path, case):
    data = to_dict(make_recipe(corpus, tmp_path / "out"))
    args = []
    if case == "unknown run label":
        args, match = ["--only", "hif8_sometimes"], "--only hif8_sometimes: the recipe has no such run (runs: bf16, hif8)"
    else:
        data["domain_eval"] = {"data_dir": str(tmp_path / "nowhere")}
        match = "nowhere does not exist"
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(app, ["train", "--config", str(config), *args])
    assert res.exit_code == 2 and match in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_domain_parts_are_disjoint_and_chat_uses_the_template(tmp_path):
    from lpq.models.tiny import build_tiny

    root = _domain_data(tmp_path)
    tok = build_tiny("tiny-llama").tokenizer
    for name in ("gsm8k", "fortunes", "wikitext2"):
        valid, test = domain_text(name, Split.VALID, root, tok), domain_text(name, Split.TEST, root, tok)
        assert valid and test and valid[:200] != test[:200]
    with pytest.raises(ValueError, match="chat template"):
        domain_text("chat", Split.TEST, root, tok)
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    chat_valid = domain_text("chat", Split.VALID, root, tok)
    chat_test = domain_text("chat", Split.TEST, root, tok)
    assert chat_valid.startswith("<s> w79 ") and chat_test.startswith("<s> w39 ")   # last record / middle - 1


def test_paired_domain_comparison():
    ref = {"a": [10.0, 12.0, 11.0, 9.0]}
    same = compare_domains(ref, ref, seq_len=5, bootstrap=500)["a"]
    assert same["ppl_increase_pct"] == same["ci95_low"] == same["ci95_high"] == 0
    worse = compare_domains(ref, {"a": [10.4, 12.4, 11.4, 9.4]}, seq_len=5, bootstrap=500)["a"]
    # every window 0.4 nats worse over 4 predictions: exp(0.1) - 1 per token, with no spread
    assert worse["ppl_increase_pct"] == pytest.approx(100 * (2.718281828 ** 0.1 - 1))
    assert worse["ci95_low"] == pytest.approx(worse["ci95_high"])


def test_stability_figures_from_traces():
    def q(flushed, lag=None):
        return {"amax": 1.0, "scale": 1.0, "overflow": 0.0, "flushed": flushed, "coarse": 0.0, "amax_vs_history": lag}

    rows = [{"step": 2, "quantizers": {"model.layers.0.self_attn.lpq_attention.p_quantizer": q(0.1, 0.5),
                                       "model.layers.1.self_attn.lpq_attention.p_quantizer": q(0.3, 1.5),
                                       "model.layers.1.mlp.down_proj.input_quantizer": q(0.0, 0.9)}},
            {"step": 4, "quantizers": {"model.layers.0.self_attn.lpq_attention.p_quantizer": q(0.2, 0.8),
                                       "model.layers.1.self_attn.lpq_attention.p_quantizer": q(0.05, 1.0)}}]
    st = stability(rows)
    assert st["p_flushed_by_block_last"] == {"0": 0.2, "1": 0.05}
    assert st["p_flushed_by_block_worst"] == {"0": 0.2, "1": 0.3}
    assert st["max_flushed"] == 0.3 and st["max_amax_vs_history"] == 1.5
    assert st["share_amax_above_history"] == pytest.approx(1 / 5)
    assert [p["max_flushed"] for p in st["over_time"]] == [0.3, 0.2]
