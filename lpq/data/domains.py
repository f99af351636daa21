"""Built-in text domains for calibration and validation, each split into disjoint parts.

A recipe calibrated and judged on one kind of text fits that text: the PTQ defaults calibrate on a
mix of these domains' `calibration` parts and choose settings on their `validation` parts; only
WikiText-2 has a `test` part (its test.txt), kept for final reports.

| domain | documents | source |
|---|---|---|
| wikitext2 | Wikipedia articles | `wikitext2/valid.txt` (test: `wikitext2/test.txt`) |
| gsm8k | math word problems with worked solutions | `gsm8k/train.jsonl`, records 0, 1, 4, 5, 8, ... |
| chat | instruct dialogs in the tokenizer's chat template (plain `User:` / `Assistant:` text for a model without one): GSM8K problems and MMLU dev questions | `gsm8k/train.jsonl` records 2, 3, 6, 7, ...; `mmlu/dev.jsonl` |
| python | Python source code | the running interpreter's standard library (tests excluded) |
| pydoc | technical English | Python's `pydoc_data.topics` |
| fortunes | quotations and short prose | `calib/fortunes_calib.txt` |

Documents alternate between the parts (even positions: calibration, odd: validation), so both
parts cover the whole domain. Never used: GSM8K test, MATH-500, MMLU test (lm-eval's evaluation sets).
Data files are read from $LPQ_DATA_DIR or ../shared/data beside the repository; nothing is copied.
"""
from __future__ import annotations

import enum
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterable

DOMAINS = ("wikitext2", "gsm8k", "chat", "python", "pydoc", "fortunes")
CHARS_PER_TOKEN_BOUND = 6      # text drawn per needed token before tokenizing (code and prose are 3-5)


class Part(str, enum.Enum):
    CALIBRATION = "calibration"
    VALIDATION = "validation"
    TEST = "test"


def data_dir() -> Path:
    """$LPQ_DATA_DIR, else ../shared/data beside the repository."""
    if os.environ.get("LPQ_DATA_DIR"):
        return Path(os.environ["LPQ_DATA_DIR"]).expanduser().resolve()
    return (Path(__file__).resolve().parents[3] / "shared" / "data").resolve()


def _file(*parts: str) -> Path:
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the built-in text domains read the shared data folder "
                                f"(set $LPQ_DATA_DIR to the folder holding wikitext2/, gsm8k/, mmlu/, calib/)")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _wikitext(path: Path) -> list[str]:
    """Articles: a top-level heading line ` = Title = ` starts each."""
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith(" = ") and not line.startswith(" = = ") or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles if "".join(a).strip()]


def _gsm8k_records(keep: tuple[int, ...]) -> list[dict]:
    return [r for i, r in enumerate(_jsonl(_file("gsm8k", "train.jsonl"))) if i % 4 in keep]


def _mmlu_prompt(r: dict) -> tuple[str, str]:
    letters = "ABCD"
    question = r["question"] + "\n" + "\n".join(f"{l}. {c}" for l, c in zip(letters, r["choices"]))
    return question + "\nAnswer with the letter of the correct choice.", \
        f"The answer is {letters[r['answer']]}: {r['choices'][r['answer']]}."


def _render_chat(tokenizer: Any, question: str, answer: str) -> str:
    """One exchange in the model's chat template; a model without one (a base model) sees it as
    plain `User:` / `Assistant:` text."""
    if getattr(tokenizer, "chat_template", None) is None:
        return f"User: {question}\nAssistant: {answer}\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)


def _chat(tokenizer: Any) -> list[str]:
    if tokenizer is None:
        raise ValueError("the 'chat' domain needs the model's tokenizer (its chat template)")
    pairs = [(r["question"], r["answer"]) for r in _gsm8k_records((2, 3))]
    mmlu = [_mmlu_prompt(r) for r in _jsonl(_file("mmlu", "dev.jsonl"))]
    # Interleave the two sources so that every stretch of the domain holds both.
    step = max(1, len(pairs) // max(1, len(mmlu)))
    mixed: list[tuple[str, str]] = []
    for i, p in enumerate(pairs):
        mixed.append(p)
        if i % step == step - 1 and mmlu:
            mixed.append(mmlu.pop(0))
    mixed += mmlu
    return [_render_chat(tokenizer, q, a) for q, a in mixed]


def _python() -> list[Path]:
    """The standard library's source files (read only when sampled: there are hundreds)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & skip)


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _fortunes() -> list[str]:
    text = _file("calib", "fortunes_calib.txt").read_text(encoding="utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


_SOURCES: dict[str, Callable[[Any], list[str | Path]]] = {
    "wikitext2": lambda tok: _wikitext(_file("wikitext2", "valid.txt")),
    "gsm8k": lambda tok: [f"{r['question']}\n{r['answer']}" for r in _gsm8k_records((0, 1))],
    "chat": _chat,
    "python": lambda tok: _python(),
    "pydoc": lambda tok: _pydoc(),
    "fortunes": lambda tok: _fortunes(),
}


def check_names(names: Iterable[str]) -> None:
    """Refuse a name that is not a built-in domain (recipes' `domains` lists and mixes)."""
    bad = [d for d in names if d not in DOMAINS]
    if bad:
        raise ValueError(f"unknown domain {bad[0]!r}; built-in domains: {', '.join(DOMAINS)}")


def check_domain(name: str, part: Part) -> None:
    if name not in DOMAINS:
        raise ValueError(f"unknown text domain {name!r}; built-in domains: {', '.join(DOMAINS)}")
    if Part(part) is Part.TEST and name != "wikitext2":
        raise ValueError(f"domain {name!r} has no test part (only wikitext2 does); use its validation part")


def documents(name: str, part: Part, tokenizer: Any = None) -> list[str | Path]:
    """The documents of one part of a domain, in source order (text, or a file read when used)."""
    part = Part(part)
    check_domain(name, part)
    if part is Part.TEST:
        return _wikitext(_file("wikitext2", "test.txt"))
    docs = _SOURCES[name](tokenizer)
    return docs[0::2] if part is Part.CALIBRATION else docs[1::2]


def _size(doc: str | Path) -> int:
    return doc.stat().st_size if isinstance(doc, Path) else len(doc)


def _text(doc: str | Path) -> str:
    return doc.read_text(encoding="utf-8", errors="replace") if isinstance(doc, Path) else doc


def sample_text(docs: list[str | Path], chars: int) -> str:
    """Documents spread over the whole list (a fixed pseudo-random order) until `chars` characters,
    joined in source order; all of them when they hold fewer."""
    import torch

    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
    picked, total = [], 0
    for i in order:
        if total >= chars:
            break
        picked.append(i)
        total += _size(docs[i])
    return "\n\n".join(_text(docs[i]) for i in sorted(picked))


def domain_windows(name: str, part: Part, tokenizer: Any, windows: int, seq_len: int):
    """(windows, seq_len) int64 token ids spread evenly over text of one part of a domain."""
    import torch

    from lpq.data.calibration import token_windows

    docs = documents(name, part, tokenizer)
    chars = windows * seq_len * CHARS_PER_TOKEN_BOUND
    while True:
        text = sample_text(docs, chars)
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
        if ids.numel() >= windows * seq_len or chars >= sum(_size(d) for d in docs):
            break
        chars *= 2
    if ids.numel() < windows * seq_len:
        raise ValueError(f"domain {name!r} ({Part(part).value}) has {ids.numel()} tokens, fewer than "
                         f"{windows} windows of {seq_len}")
    return token_windows(ids, windows, seq_len).to(torch.long)
