"""Small local fixtures in the ../shared/data layout, and a tiny Llama whose tokenizer knows their words."""
import csv
import json
import random

import pytest

WORDS = [f"w{i}" for i in range(4, 60)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _wikitext_lines(rng: random.Random) -> list[str]:
    lines = []
    for a in range(3):
        lines += [" ", f" = {WORDS[a]} {WORDS[a + 1]} = ", " "]
        for _ in range(4):
            lines.append(" " + " ".join(rng.choice(WORDS) for _ in range(150)) + " ")
    return lines


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are all small ops: one thread avoids OpenMP spin-waits on a busy shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """mmlu, gsm8k, math500, gpqa (placeholder text, CSV and JSONL) and wikitext2 fixtures."""
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    mmlu = [{"subject": "fixture_topic", "question": f"Which word follows {WORDS[i]} ?",
             "choices": [WORDS[(i + k) % len(WORDS)] for k in range(4)], "answer": i % 4} for i in range(16)]
    _write_jsonl(root / "mmlu" / "test.jsonl", mmlu)
    _write_jsonl(root / "mmlu" / "dev.jsonl", mmlu[:5])
    gsm = [{"question": f"What is {a} plus {a + 1} ?", "answer": f"{a} + {a + 1} = {2 * a + 1}\n#### {2 * a + 1}"}
           for a in range(1, 9)]
    _write_jsonl(root / "gsm8k" / "test.jsonl", gsm[:6])
    _write_jsonl(root / "gsm8k" / "train.jsonl", gsm[6:])
    _write_jsonl(root / "math500" / "test.jsonl",
                 [{"problem": f"Compute {a} times 2 .", "solution": f"It is \\boxed{{{2 * a}}}", "answer": str(2 * a),
                   "subject": "Prealgebra", "level": 1, "unique_id": f"test/fixture/{a}.json"} for a in range(5)])
    gpqa_rows = [{"Question": f"Placeholder question {i} ?", "Correct Answer": f"placeholder right {i}",
                  "Incorrect Answer 1": f"placeholder wrong a{i}", "Incorrect Answer 2": f"placeholder wrong b{i}",
                  "Incorrect Answer 3": f"placeholder wrong c{i}", "Record ID": f"rec{i}"} for i in range(6)]
    (root / "gpqa").mkdir()
    with open(root / "gpqa" / "gpqa_diamond.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(gpqa_rows[0]))
        w.writeheader()
        w.writerows(gpqa_rows)
    _write_jsonl(root / "gpqa_jsonl" / "gpqa.jsonl", gpqa_rows)
    (root / "wikitext2").mkdir()
    (root / "wikitext2" / "test.txt").write_text("\n".join(_wikitext_lines(rng)) + "\n")
    video = [{"prompt_en": "w4 w5 w6", "dimension": ["temporal_flickering"]},
             {"prompt_en": "w7 w8", "dimension": ["subject_consistency"]},
             {"prompt_en": "w9 w10", "dimension": ["temporal_flickering"]}]
    (root / "video").mkdir()
    (root / "video" / "vbench_prompts.json").write_text(json.dumps(video))
    return root


def fixture_tokenizer():
    """Word-level tokenizer over every word the fixtures and lm-eval's prompt templates use."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    template = ("The following are multiple choice questions with answers about fixture topic Which word follows "
                "Answer A B C D Question What is plus Compute times Problem Please reason step by and put your "
                "final answer within boxed Solution It is the correct to this Choices placeholder right wrong "
                "a b c = + . , : ? ( ) \\ { } #### # -").split()
    numbers = [str(i) for i in range(40)]
    extra = [f"{p}{i}" for p in "abc" for i in range(6)]
    vocab = list(dict.fromkeys(specials + template + numbers + extra + WORDS))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer): tiny random Llama (vocab 1000) with the fixture tokenizer."""
    from lpq.models.tiny import tiny_causal_lm

    return tiny_causal_lm("tiny-llama"), fixture_tokenizer()


def perturbed(model, scale: float = 0.02, seed: int = 1):
    """A copy of `model` with Gaussian noise on every weight: a stand-in candidate."""
    import copy

    import torch

    cand = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return cand
