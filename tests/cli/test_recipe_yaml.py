"""Issue 15, recipe YAML: duplicate keys are refused with file:line:key; `1e-3` is a float."""
from __future__ import annotations

import pytest

from lpq.config import ConfigError, load_config, parse_value
from tests.cli.helpers import error_line, lpq, snapshot


@pytest.mark.parametrize("text, where", [
    ("model:\n  id: tiny-llama\nquant:\n  format: mxfp4\nmodel:\n  id: tiny-qwen3\n",
     "r.yaml:5: duplicate key 'model' (first at line 1)"),
    ("model:\n  id: tiny-llama\n  dtype: float32\n  dtype: bfloat16\nquant:\n  format: mxfp4\n",
     "r.yaml:4: duplicate key 'model.dtype' (first at line 3)"),
    ("model: {id: tiny-llama}\nquant:\n  format: mxfp4\n  protected_blocks: [0]\n  format: hif4\n",
     "r.yaml:5: duplicate key 'quant.format' (first at line 3)"),
])
def test_duplicate_keys_are_refused(tmp_path, text, where):
    (tmp_path / "r.yaml").write_text(text)
    before = snapshot(tmp_path)
    code, out = lpq("export", "--config", tmp_path / "r.yaml", "--out", tmp_path / "o")
    assert code == 2 and where in error_line(out)
    assert snapshot(tmp_path) == before


def test_merge_keys_may_be_overridden(tmp_path):
    """`<<: *anchor` followed by an explicit key is YAML's override, not a duplicate."""
    from lpq.export.settings import ExportSettings

    (tmp_path / "s.yaml").write_text("<<: {kind: fake, max_shard_gb: 2.0}\nkind: packed\n")
    settings = load_config(tmp_path / "s.yaml", ExportSettings)
    assert settings.kind == "packed" and settings.max_shard_gb == 2.0
    (tmp_path / "d.yaml").write_text("<<: {kind: fake}\nkind: packed\nkind: fake\n")
    with pytest.raises(ConfigError, match=r"d.yaml:3: duplicate key 'kind' \(first at line 2\)"):
        load_config(tmp_path / "d.yaml", ExportSettings)


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("1.0e-3", 0.001), ("-2E5", -200000.0), (".5e3", 500.0),
                                         ("1e3", 1000.0), ("1.5", 1.5), ("12", 12), ("e5", "e5"), ("1e", "1e")])
def test_numbers_in_exponent_form_are_floats(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_lr_written_as_1e_minus_3_in_a_file_and_with_set(tmp_path):
    from lpq.train.recipe import load_recipe

    (tmp_path / "t.yaml").write_text("model: {id: tiny-llama}\ntrain: {lr: 1e-3, min_lr_ratio: 5e-2}\n"
                                     "data: {paths: [x.jsonl]}\n")
    recipe = load_recipe(tmp_path / "t.yaml", {})
    assert recipe.train.lr == 0.001 and recipe.train.min_lr_ratio == 0.05
    from lpq.pipelines.train import parse_overrides

    assert parse_overrides(["train.lr=2e-4"]) == {"train.lr": 0.0002}


def test_an_int_written_as_a_float_still_says_which_key(tmp_path):
    (tmp_path / "t.yaml").write_text("model: {id: tiny-llama}\ntrain: {steps: 1e3}\ndata: {paths: [x.jsonl]}\n")
    code, out = lpq("train", "--config", tmp_path / "t.yaml")
    assert code == 2 and "t.yaml:2: 'train.steps' must be int, got 1000.0" in error_line(out)
