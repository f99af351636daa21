"""run_paired: baseline vs candidate, per-item JSONL, results.json schema, report, baseline cache."""
import json

import pytest

import lpq.eval.paired as paired
from lpq.eval.settings import EvalSettings
from tests.eval.conftest import perturbed

REQUIRED = {"baseline", "quantized", "rel_loss_pct", "ci95_low", "ci95_high", "agreement", "n"}


def _settings(data_dir, tmp_path, **kw):
    return EvalSettings(data_dir=str(data_dir), tasks=["mmlu", "wikitext2"], limit=8, bootstrap=500,
                        kl_windows=2, kl_seq_len=64, cache_dir=str(tmp_path / "cache"), **kw)


def test_paired_report_schema_files_and_cache(data_dir, tiny_lm, tmp_path, monkeypatch):
    model, tok = tiny_lm
    cand = perturbed(model, scale=0.05)
    calls = []
    real = paired.run_task
    monkeypatch.setattr(paired, "run_task", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    s = _settings(data_dir, tmp_path)
    res = paired.run_paired(model, cand, tok, s, tmp_path / "out", model_name="tiny")
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["tasks"].keys() == {"mmlu", "wikitext2"}
    for name, t in on_disk["tasks"].items():
        assert REQUIRED <= t.keys()
        lines = (tmp_path / "out" / "items" / f"{name}.quantized.jsonl").read_text().splitlines()
        assert len(lines) == t["n"] == (8 if name == "mmlu" else 3)
    mmlu = on_disk["tasks"]["mmlu"]
    assert 0 <= mmlu["agreement"] <= 1 and mmlu["subset"] == "8 items, seed 0"
    assert on_disk["tasks"]["wikitext2"]["agreement"] is None
    assert on_disk["mean_abs_pct_loss_tasks"] == ["mmlu"]
    assert "mean_abs_pct_loss" in on_disk
    assert on_disk["distribution_shift"]["kl_div"] > 0
    assert on_disk["chat_template"] is False and on_disk["versions"]["lm_eval"] == "0.4.13"
    assert (tmp_path / "out" / "deltas.png").stat().st_size > 1000
    report = (tmp_path / "out" / "report.md").read_text()
    assert "rel loss %" in report and "wikitext2" in report and "KL(baseline||quantized)" in report
    assert res["tasks"]["wikitext2"]["rel_loss_pct"] == on_disk["tasks"]["wikitext2"]["rel_loss_pct"]
    assert calls.count(model) == 2 and calls.count(cand) == 2
    # Second run: the baseline comes from the cache, only the candidate is evaluated.
    again = paired.run_paired(model, cand, tok, s, tmp_path / "out2")
    assert calls.count(model) == 2 and calls.count(cand) == 4
    assert again["tasks"]["mmlu"]["baseline"] == res["tasks"]["mmlu"]["baseline"]


def test_a_model_against_itself_loses_nothing(data_dir, tiny_lm, tmp_path):
    model, tok = tiny_lm
    s = _settings(data_dir, tmp_path, use_cache=False)
    res = paired.run_paired(model, model, tok, s, tmp_path / "same")
    for t in res["tasks"].values():
        assert (t["diff"], t["diff_ci95_low"], t["diff_ci95_high"]) == (0.0, 0.0, 0.0)
    assert (res["tasks"]["wikitext2"]["rel_loss_pct"], res["tasks"]["wikitext2"]["ci95_high"]) == (0.0, 0.0)
    assert res["tasks"]["mmlu"]["agreement"] == 1.0
    assert res["distribution_shift"]["kl_div"] == pytest.approx(0.0, abs=1e-7)
