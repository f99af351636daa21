"""`data.mix`: training on several built-in text domains, from parts no scored window reads, with the
held-out blocks shared out the same way."""
import json
import re

import pytest

from lpq.config import ConfigError, from_dict, load_config, to_dict
from lpq.train.data import mix_splits
from lpq.train.domains import domain_text, train_documents
from lpq.train.recipe import DataConfig, Split, TrainRecipe
from tests.train.helpers import make_recipe


def _marked_data(root, records=2000):
    """Stand-ins for the shared data whose every document carries a unique marker (<a1>, <q7>, <f3>)."""
    (root / "wikitext2").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    (root / "calib").mkdir()
    articles = "".join(f" = Title {i} = \n \n <a{i}> w1 w2 w3 w{i % 9}\n \n" for i in range(80))
    (root / "wikitext2" / "valid.txt").write_text(articles)
    (root / "wikitext2" / "test.txt").write_text(articles.replace("<a", "<t"))
    (root / "gsm8k" / "train.jsonl").write_text("".join(
        json.dumps({"question": f"<q{i}> w{i % 11} w3", "answer": f"w{i % 7} w9 #### {i}"}) + "\n"
        for i in range(records)))
    (root / "calib" / "fortunes_calib.txt").write_text("\n\n".join(f"<f{i}> w{i % 5} w6 w7" for i in range(400)))
    return root


def _markers(texts, letter):
    return {m for t in texts for m in re.findall(rf"<{letter}\d+>", str(t))}


def test_training_parts_never_meet_a_scored_part(tmp_path):
    from lpq.models.tiny import build_tiny

    root = _marked_data(tmp_path)
    tok = build_tiny("tiny-llama").tokenizer
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    for name, letter in (("wikitext2", "a"), ("gsm8k", "q"), ("chat", "q"), ("fortunes", "f")):
        train = _markers(train_documents(name, root, tok), letter)
        assert train, name
        for split in Split:
            scored = _markers([domain_text(name, split, root, tok)], letter)
            assert not train & scored, (name, split, sorted(train & scored)[:3])
    # gsm8k and chat share one file: every scored part of either stays out of both training parts
    scored = set().union(*(_markers([domain_text(n, s, root, tok)], "q") for n in ("gsm8k", "chat") for s in Split))
    assert not _markers(train_documents("gsm8k", root, tok), "q") & scored
    # the first scored windows are those of the unbounded parts (the previous definition's prefixes)
    assert domain_text("gsm8k", Split.TEST, root, tok).startswith("<q1000> ")
    assert domain_text("chat", Split.VALID, root, tok).startswith("<s> <q1999> ")


def test_mix_shares_blocks_by_weight_and_holds_out_each_domain(tmp_path):
    from lpq.models.tiny import build_tiny

    root = _marked_data(tmp_path)
    tok = build_tiny("tiny-llama").tokenizer
    cfg = DataConfig(mix={"gsm8k": 2, "fortunes": 1, "wikitext2": 1}, data_dir=str(root), seq_len=8,
                     eval_blocks=4, max_train_blocks=8)
    splits = mix_splits(cfg, tok)
    assert splits.train.shape == (8, 8) and splits.eval.shape == (4, 8)
    # gsm8k's 4 training blocks come first, then its 2 held-out blocks follow its own text
    gsm8k = mix_splits(DataConfig(mix={"gsm8k": 1}, data_dir=str(root), seq_len=8, eval_blocks=2,
                                  max_train_blocks=4), tok)
    assert (splits.train[:4] == gsm8k.train).all() and (splits.eval[:2] == gsm8k.eval).all()
    with pytest.raises(ValueError, match=r"data.mix: domain 'fortunes'.* fewer than 100002 blocks"):
        mix_splits(DataConfig(mix={"fortunes": 1}, data_dir=str(root), seq_len=8, eval_blocks=2,
                              max_train_blocks=100000), tok)


@pytest.mark.parametrize("text, match", [
    ("data: {mix: {wikitext2: 1, news: 1}}\n",
     r"r\.yaml:1: 'data': mix: unknown domain 'news'; allowed: wikitext2, gsm8k, chat, python, pydoc, fortunes"),
    ("data: {mix: {wikitext2: 0}}\n", r"'data': mix.wikitext2: weights must be > 0, got 0.0"),
    # a check about one key is reported at that key's line
    ("data:\n  mix:\n    gsm8k: 1\n    wikitext2: -1\n", r"r\.yaml:4: 'data': mix.wikitext2: weights must be > 0"),
    ("train:\n  lr: 1.0e-5\n  steps: 0\n", r"r\.yaml:3: 'train': steps must be >= 1, got 0"),
    ("data: {mix: {wikitext2: 1}, paths: [a.txt]}\n", r"'data': set either paths or mix, not both"),
    ("data: {mix: {wikitext2: 1, gsm8k: 1}, eval_blocks: 1}\n",
     r"'data': eval_blocks \(1\) must be >= the number of mix domains \(2\)"),
    ("data: {kind: wan_latents, cache_dir: x, mix: {gsm8k: 1}}\n", r"'data': mix is a mix of text domains; it needs kind"),
])
def test_bad_mix_is_named(tmp_path, text, match):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, TrainRecipe)


def test_mix_trains_and_scores_its_held_out_blocks(corpus, tmp_path):
    from lpq.train.compare import run_training

    data = to_dict(make_recipe(corpus, tmp_path / "out", steps=3, bf16_warmup_steps=1, reference_run=False))
    data["data"] = {"mix": {"gsm8k": 1, "fortunes": 1}, "data_dir": str(tmp_path / "nowhere"), "seq_len": 16,
                    "eval_blocks": 4, "max_train_blocks": 12}
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        run_training(from_dict(data, TrainRecipe))
    assert not (tmp_path / "out").exists()               # refused before any model loaded
    data["data"]["data_dir"] = str(_marked_data(tmp_path / "data"))
    data["domain_eval"] = {"domains": ["gsm8k"], "windows": 2, "seq_len": 16, "split": "valid",
                           "data_dir": data["data"]["data_dir"], "bootstrap": 100}
    report = run_training(from_dict(data, TrainRecipe))
    assert report["runs"]["hif8"]["eval_loss"] > 0
    nll = json.loads((tmp_path / "out" / "hif8" / "domain_nll.json").read_text())["nll"]
    assert len(nll["train_heldout"]) == 4 and len(nll["gsm8k"]) == 2     # 4 x 16 held-out tokens, 2 windows
