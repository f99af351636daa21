"""Built-in text domains: disjoint parts, deterministic windows, the calibration mix."""
import pytest
import torch

from lpq.data import domains as D
from lpq.data.calibration import CalibrationConfig, calibration_tokens, domain_shares


@pytest.fixture(scope="module")
def tokenizer():
    from lpq.models.tiny import _word_tokenizer

    return _word_tokenizer(1000)


@pytest.mark.parametrize("name", [d for d in D.DOMAINS if d != "chat"])
def test_parts_are_disjoint_and_windows_deterministic(name, tokenizer):
    if not D.data_dir().is_dir():
        pytest.skip("shared data folder not found")
    cal, val = D.documents(name, D.Part.CALIBRATION), D.documents(name, D.Part.VALIDATION)
    everything = D._SOURCES[name](tokenizer)
    assert cal and val and len(cal) + len(val) == len(everything)     # a partition of the documents
    assert cal == everything[0::2] and val == everything[1::2]
    a = D.domain_windows(name, D.Part.VALIDATION, tokenizer, 3, 32)
    b = D.domain_windows(name, D.Part.VALIDATION, tokenizer, 3, 32)
    assert a.shape == (3, 32) and torch.equal(a, b)


def test_chat_uses_the_chat_template_or_plain_turns(tokenizer):
    if not D.data_dir().is_dir():
        pytest.skip("shared data folder not found")
    plain = D.documents("chat", D.Part.CALIBRATION, tokenizer)              # no template: a base model
    assert all(d.startswith("User: ") and "\nAssistant: " in d for d in plain)

    class Templated:
        chat_template = "x"

        @staticmethod
        def apply_chat_template(messages, tokenize):
            return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)

    docs = D.documents("chat", D.Part.VALIDATION, Templated())
    assert all(d.startswith("<user>") and "</assistant>" in d for d in docs)
    assert any("Answer with the letter" in d for d in docs)          # MMLU dev questions are mixed in
    firsts = {D._text(d).split("\n")[0] for d in D.documents("gsm8k", D.Part.CALIBRATION)}
    assert not any(d[len("<user>"):].split("</user>")[0] in firsts for d in docs[:200])   # other GSM8K records


def test_only_wikitext2_has_a_test_part():
    with pytest.raises(ValueError, match="no test part"):
        D.documents("gsm8k", D.Part.TEST)
    with pytest.raises(ValueError, match="unknown text domain 'wiki'"):
        D.documents("wiki", D.Part.VALIDATION)


def test_shares_and_interleaving(tokenizer):
    assert domain_shares({"a": 1, "b": 1, "c": 2}, 16) == {"a": 4, "b": 4, "c": 8}
    assert sum(domain_shares({d: 1 for d in "abcdef"}, 16).values()) == 16
    with pytest.raises(ValueError, match="cannot hold one window"):
        domain_shares({"a": 1, "b": 1}, 1)
    if not D.data_dir().is_dir():
        pytest.skip("shared data folder not found")
    cfg = CalibrationConfig(domains={"pydoc": 1, "fortunes": 1}, num_sequences=4, seq_len=16)
    ids = calibration_tokens(cfg, tokenizer)
    pydoc = D.domain_windows("pydoc", D.Part.CALIBRATION, tokenizer, 2, 16)
    fortunes = D.domain_windows("fortunes", D.Part.CALIBRATION, tokenizer, 2, 16)
    assert torch.equal(ids, torch.stack([pydoc[0], fortunes[0], pydoc[1], fortunes[1]]))
    with pytest.raises(ValueError, match="unknown domain 'code'"):
        CalibrationConfig(domains={"code": 1})
    with pytest.raises(ValueError, match="exactly one of domains"):
        CalibrationConfig(domains={"pydoc": 1}, text_file="x.txt")
