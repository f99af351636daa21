"""lpq.eval.settings.DomainEvalSettings: the per-domain perplexity settings of `lpq ptq` (evaluation.domain_eval
and its short form) and `lpq train` (domain_eval) are one schema, validated once, read by both runtimes."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from lpq.config import ConfigError, from_dict, load_config, to_dict
from lpq.eval.settings import DomainEvalSettings, Split
from lpq.pipelines.ptq_config import EvalConfig
from lpq.train.recipe import DomainEvalConfig, TrainRecipe


@dataclass
class _Evaluation:
    """A recipe of ptq's `evaluation:` section alone (the rest of a ptq recipe is not needed here)."""

    evaluation: EvalConfig


def test_settings_load_without_torch():
    import subprocess

    code = ("import sys, lpq.eval.settings, lpq.pipelines.ptq_config, lpq.train.recipe, lpq.eval.recipe; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_one_schema_for_ptq_and_train():
    ptq = from_dict({"domain_eval": {"domains": ["gsm8k"], "windows": 3}}, EvalConfig).domain_eval
    train = from_dict({"domain_eval": {"domains": ["gsm8k"], "windows": 3}}, TrainRecipe).domain_eval
    assert type(ptq) is DomainEvalSettings and isinstance(train, DomainEvalSettings)
    assert (ptq.windows, train.windows) == (3, 3)
    # Each command keeps its defaults: ptq validation parts, train every domain it reads on test halves.
    assert (ptq.split, ptq.seq_len, ptq.batch_size) == (Split.VALID, 512, 2)
    assert to_dict(DomainEvalConfig()) == {"domains": ["wikitext2", "gsm8k", "chat", "fortunes"], "split": "test",
                                           "windows": 8, "seq_len": 256, "batch_size": 4, "data_dir": None,
                                           "bootstrap": 10000, "held_out": True}


def test_the_ptq_short_form_is_the_same_settings(tmp_path):
    old = from_dict({"seq_len": 64, "batch_size": 3, "domains": ["pydoc", "fortunes"], "domain_windows": 5},
                    EvalConfig)
    new = from_dict({"seq_len": 64, "batch_size": 3,
                     "domain_eval": {"domains": ["pydoc", "fortunes"], "windows": 5, "seq_len": 64, "batch_size": 3}},
                    EvalConfig)
    assert old == new and old.domains is None and old.domain_windows is None
    # recipe.yaml keeps the folded form, and it loads back to the same section
    assert "domains" not in to_dict(old) and from_dict(to_dict(old), EvalConfig) == old
    assert from_dict({"domains": ["pydoc"]}, EvalConfig).domain_eval.windows == 8     # the old default
    assert from_dict({"domains": []}, EvalConfig).domain_eval is None


@pytest.mark.parametrize("section, message", [
    ({"domain_eval": {"domains": ["news"]}}, r"r.yaml:2: 'evaluation.domain_eval': unknown domain 'news'; "
                                             r"built-in domains: wikitext2, gsm8k"),
    ({"domains": ["news"]}, r"r.yaml:1: 'evaluation': unknown domain 'news'"),
    ({"domain_eval": {"windows": 0}}, r"'evaluation.domain_eval': windows must be >= 1, got 0"),
    ({"domains": ["pydoc"], "domain_windows": 0}, r"'evaluation': domain_windows must be >= 1, got 0"),
    ({"domain_eval": {"split": "tests"}}, r"r.yaml:3: 'evaluation.domain_eval.split': 'tests' is not allowed; "
                                          r"use one of 'valid', 'test'"),
    ({"domain_eval": {"domains": ["gsm8k"], "split": "test"}}, r"domain 'gsm8k' has no test part"),
    ({"domain_eval": {"data_dir": "/data"}}, r"domain_eval.data_dir: lpq ptq reads the built-in domains from "
                                             r"\$LPQ_DATA_DIR"),
    ({"domains": ["pydoc"], "domain_eval": {}}, r"set domain_eval, or its short form domains / domain_windows"),
])
def test_ptq_domain_settings_errors_name_file_and_key(tmp_path, section, message):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"evaluation": section}, sort_keys=False))
    with pytest.raises(ConfigError, match=message):
        load_config(path, _Evaluation)


def test_train_reads_only_its_domains(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("domain_eval:\n  domains: [wikitext2, python]\n")
    with pytest.raises(ConfigError, match="t.yaml:1: 'domain_eval': domain 'python' is not scored by lpq train; "
                                          "its domains: wikitext2, gsm8k, chat, fortunes"):
        load_config(path, TrainRecipe)
    path.write_text("domain_eval:\n  domains: [wikitext2, gsm8k, gsm8k]\n")
    with pytest.raises(ConfigError, match="domains has duplicates"):
        load_config(path, TrainRecipe)


def test_ptq_scores_domains_with_their_own_settings(monkeypatch):
    """lpq/eval/ptq_quality.py reads domain_eval: its windows, length, part, batch and bootstrap."""
    import torch

    from lpq.eval import ptq_quality

    asked, batches, compared = [], [], []
    monkeypatch.setattr("lpq.data.domains.domain_windows",
                        lambda name, part, tok, n, seq_len: asked.append((name, part.value, n, seq_len))
                        or torch.zeros(n, seq_len, dtype=torch.long))
    monkeypatch.setattr("lpq.eval.shift.token_windows", lambda tok, text, n, seq_len: torch.zeros(n, seq_len))

    def baseline(model, ids, batch):
        batches.append(batch)
        return [1.0] * ids.shape[0]

    monkeypatch.setattr(ptq_quality, "baseline_nll", baseline)
    monkeypatch.setattr("lpq.train.domains.window_nll", lambda m, ids, b: [1.0] * ids.shape[0])
    from lpq.train.domains import compare_domains as real

    def compare(ref, cand, seq_len, bootstrap=10000, seed=0):
        compared.append((list(ref), seq_len, bootstrap))
        return real(ref, cand, seq_len, bootstrap, seed)

    monkeypatch.setattr("lpq.train.domains.compare_domains", compare)
    ev = from_dict({"wikitext2": __file__, "windows": 2, "kl_windows": 0, "seq_len": 16, "batch_size": 1,
                    "domain_eval": {"domains": ["pydoc", "wikitext2"], "split": "valid", "windows": 3,
                                    "seq_len": 8, "batch_size": 3, "bootstrap": 50}}, EvalConfig)
    loaded = type("Loaded", (), {"tokenizer": None, "model": None, "name": "m"})()
    res = ptq_quality.evaluate_causal_lm(loaded, None, ev, None)
    assert asked == [("pydoc", "validation", 3, 8), ("wikitext2", "validation", 3, 8)]
    assert batches == [1, 3, 3]
    assert compared == [(["wikitext2_test"], 16, 10000), (["pydoc", "wikitext2"], 8, 50)]
    assert list(res["domains"]) == ["wikitext2_test", "pydoc", "wikitext2"]

