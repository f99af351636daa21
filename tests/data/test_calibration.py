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
    with pytest.raises(ValueError, match=r"b.jsonl:1: no field 'text' \(fields: body\); set calibration.jsonl_field"):
        read_text(CalibrationConfig(jsonl=str(tmp_path / "b.jsonl")))


@pytest.mark.parametrize("name, data, key, message", [
    ("t.txt", b"w1 \xff\xfe w2", "text_file", r"calibration.text_file: .*t.txt is not UTF-8 text \(byte 3\)"),
    ("t.txt", b"  \n\n", "text_file", r"calibration.text_file: .*t.txt holds no text"),
    ("j.jsonl", b'{"text": "w1"}\nnot json\n', "jsonl", r"j.jsonl:2: not valid JSON \(Expecting value, column 1\)"),
    ("j.jsonl", b'{"text": "w1"}\n[1, 2]\n', "jsonl", r"j.jsonl:2: expected a JSON object per line, got list"),
    ("j.jsonl", b"\n\n", "jsonl", r"calibration.jsonl: .*j.jsonl holds no records"),
    ("p.json", b'{"prompt": "x"}', "prompts", r"p.json: expected a JSON list of records, got dict"),
    ("p.json", b'["x",', "prompts", r"p.json:1: not valid JSON"),
    ("p.jsonl", b'{"prompt": "x"}\n{bad\n', "prompts", r"p.jsonl:2: not valid JSON"),
])
def test_unreadable_data_files_are_one_line_errors_naming_file_and_line(tmp_path, name, data, key, message):
    (tmp_path / name).write_bytes(data)
    cfg = CalibrationConfig(**{key: str(tmp_path / name)})
    with pytest.raises(ValueError, match=message) as e:
        read_prompts(cfg) if key == "prompts" else read_text(cfg)
    assert "\n" not in str(e.value)


def test_a_folder_or_a_missing_file_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"calibration.text_file: .* is a folder, not a file"):
        read_text(CalibrationConfig(text_file=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"calibration.jsonl: .*nope.jsonl not found"):
        read_text(CalibrationConfig(jsonl=str(tmp_path / "nope.jsonl")))


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
