import json

import pytest
import torch

from lpq.data.calibration import CalibrationConfig, calibration_tokens, read_prompts, read_text, token_windows
from lpq.models.tiny import _word_tokenizer


def test_token_windows_are_spread_and_disjoint():
    ids = torch.arange(1000)
    w = token_windows(ids, 4, 100)
    assert w.shape == (4, 100)
    assert w[0, 0] == 0 and w[-1, 0] == 900
    assert len(set(w.flatten().tolist())) == 400
    with pytest.raises(ValueError, match="holds 0 windows of 100 tokens .10 tokens., fewer than the 1 asked for"):
        token_windows(torch.arange(10), 1, 100)
    with pytest.raises(ValueError, match="holds 10 windows .* fewer than the 11 asked for"):   # never cut silently
        token_windows(ids, 11, 100)


def test_text_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(300)))
    cfg = CalibrationConfig(text_file=str(tmp_path / "a.txt"), num_sequences=2, seq_len=50)
    toks = calibration_tokens(cfg, _word_tokenizer(1000))
    assert toks.shape == (2, 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    assert read_text(CalibrationConfig(jsonl=str(tmp_path / "b.jsonl"), jsonl_field="body")) == "w1 w2"
    with pytest.raises(KeyError, match="no field"):
        read_text(CalibrationConfig(jsonl=str(tmp_path / "b.jsonl")))


def test_prompts_and_validation(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\nsurfing\n")
    assert read_prompts(CalibrationConfig(prompts=str(tmp_path / "p.txt"), num_prompts=2)) == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt_en": "x"}, "y"]))
    assert read_prompts(CalibrationConfig(prompts=str(tmp_path / "p.json"))) == ["x", "y"]
    with pytest.raises(ValueError, match="exactly one"):
        CalibrationConfig()
    with pytest.raises(ValueError, match="exactly one"):
        CalibrationConfig(text_file="a", prompts="b")
    with pytest.raises(FileNotFoundError):
        read_text(CalibrationConfig(text_file=str(tmp_path / "missing.txt")))
