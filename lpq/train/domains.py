"""Evaluation on several text domains: per-window negative log-likelihoods and paired comparisons, and
the training parts of those domains (`data.mix`).

QAT on one corpus can hide a loss elsewhere, so `lpq train` scores every trained model on fixed token
windows of several domains and compares each quantized run with the reference run window by window
(a paired bootstrap: the window-to-window variance both models share cancels).

Built-in domains, each with three disjoint parts: `valid` (for choosing settings), `test` (for the
final report; `lpq train` scores it by default) and `train` (what `data.mix` trains on). Scored windows
are cut from the start of their part, and every part is bounded, so no window can reach training text:

* `wikitext2`: valid = the first half of WikiText-2 `valid.txt`, test = `test.txt`, train = the second
  half of `valid.txt`;
* `gsm8k`: GSM8K *train* problems as plain text (question, then worked answer); of its n records,
  valid = the first quarter, test = the third quarter (from the middle on);
* `chat`: the same file's problems in the tokenizer's chat template (user asks, assistant answers), at
  most 400 conversations from the end backwards (valid) or from the middle backwards (test), inside the
  second and fourth quarters; train (plain and chat alike) = the rest of those two quarters;
* `fortunes`: `calib/fortunes_calib.txt`; valid = the first quarter, test = the third, train = the second
  and fourth;
* training only (`data.mix`; no scored part): `python` (the standard library's source, as
  lpq.data.domains reads it) and `pydoc` (Python's documentation topics).

The training corpus's own held-out blocks are added by `lpq train` as domain `train_heldout`.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lpq.train.recipe import DomainEvalConfig, Split


CHAT_RECORDS = 400      # conversations per scored chat part: far more tokens than any window count here needs


def resolve_root(data_dir: str | None, what: str) -> Path:
    """The shared data folder: `data_dir`, else $LPQ_DATA_DIR, else ../shared/data beside the repo."""
    from lpq.eval.settings import resolve_data_dir

    found = resolve_data_dir(data_dir)
    if found is None:
        raise FileNotFoundError(f"{what}: no data folder: set {what}.data_dir or $LPQ_DATA_DIR to the "
                                "folder holding wikitext2/, gsm8k/ and calib/")
    if not found.is_dir():
        raise FileNotFoundError(f"{what}: data folder {found} does not exist ({what}.data_dir or $LPQ_DATA_DIR)")
    return found


def data_dir(cfg: DomainEvalConfig) -> Path:
    return resolve_root(cfg.data_dir, "domain_eval")


def domain_file(name: str, split: Split, root: Path) -> Path:
    """The file a domain's scored text comes from."""
    if name == "wikitext2":
        return root / "wikitext2" / f"{split.value}.txt"
    return root / ("calib/fortunes_calib.txt" if name == "fortunes" else "gsm8k/train.jsonl")


def check_domain_files(cfg: DomainEvalConfig) -> None:
    """Fail early (before any model is loaded), naming the file, when a domain's data is missing."""
    root = data_dir(cfg)
    for name in cfg.domains:
        path = domain_file(name, cfg.split, root)
        if not path.is_file():
            raise FileNotFoundError(f"domain_eval: domain {name!r} needs {path}, which does not exist "
                                    f"(set domain_eval.data_dir or $LPQ_DATA_DIR)")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _record_parts(n: int) -> dict[str, list[int]]:
    """Record indices of every gsm8k / chat part (module docstring), in reading order."""
    q, mid = n // 4, n // 2
    chat_test, chat_valid = max(q, mid - CHAT_RECORDS), max(mid + q, n - CHAT_RECORDS)
    return {"gsm8k/valid": list(range(q)), "gsm8k/test": list(range(mid, mid + q)),
            "chat/valid": list(range(n - 1, chat_valid - 1, -1)), "chat/test": list(range(mid - 1, chat_test - 1, -1)),
            "train": list(range(q, chat_test)) + list(range(mid + q, chat_valid))}


def _chat_text(tokenizer, record: dict) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("domain 'chat' needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": record["question"]},
                                          {"role": "assistant", "content": record["answer"]}], tokenize=False)


def _halves(path: Path) -> tuple[str, str]:
    text = path.read_text(encoding="utf-8")
    return text[: len(text) // 2], text[len(text) // 2:]


def domain_text(name: str, split: Split, root: Path, tokenizer) -> str:
    """The text of one domain's scored part; windows are cut from its start."""
    path = domain_file(name, split, root)
    if name == "wikitext2":
        return _halves(path)[0] if split is Split.VALID else path.read_text(encoding="utf-8")
    if name == "fortunes":
        first, second = _halves(path)
        half = first if split is Split.VALID else second
        return half[: len(half) // 2]
    records = _records(path)
    part = _record_parts(len(records))[f"{name}/{split.value}"]
    if name == "gsm8k":
        return "\n\n".join(f"{records[i]['question']}\n{records[i]['answer']}" for i in part)
    try:
        return "".join(_chat_text(tokenizer, records[i]) for i in part)
    except ValueError as err:
        raise ValueError(f"domain_eval: {err}") from None


def train_documents(name: str, root: Path, tokenizer) -> list[str | Path]:
    """The documents of one domain's training part (text no scored window reads), in source order;
    python files are read when used."""
    from lpq.data.domains import Part, documents

    if name in ("python", "pydoc"):
        return documents(name, Part.CALIBRATION) + documents(name, Part.VALIDATION)
    if name == "wikitext2":
        # one document per article (a top-level heading line ` = Title = ` starts each)
        text = _halves(root / "wikitext2" / "valid.txt")[1]
        return [a for a in re.split(r"(?m)^(?= = [^=])", text) if a.strip()]
    if name == "fortunes":
        first, second = _halves(root / "calib" / "fortunes_calib.txt")
        return [d for part in (first[len(first) // 2:], second[len(second) // 2:]) for d in part.split("\n\n")
                if d.strip()]
    records = _records(root / "gsm8k" / "train.jsonl")
    part = _record_parts(len(records))["train"]
    if name == "gsm8k":
        return [f"{records[i]['question']}\n{records[i]['answer']}" for i in part]
    return [_chat_text(tokenizer, records[i]) for i in part]


def train_files(name: str, root: Path) -> list[Path]:
    """The shared-data files a mix domain reads (none for python and pydoc: they come with Python)."""
    return {"wikitext2": [root / "wikitext2" / "valid.txt"], "gsm8k": [root / "gsm8k" / "train.jsonl"],
            "chat": [root / "gsm8k" / "train.jsonl"], "fortunes": [root / "calib" / "fortunes_calib.txt"]}.get(name, [])


def domain_windows(cfg: DomainEvalConfig, tokenizer) -> dict[str, torch.Tensor]:
    """(windows, seq_len) token ids per configured domain (fewer windows if a text is short)."""
    from lpq.eval.shift import token_windows

    check_domain_files(cfg)
    root = data_dir(cfg)
    return {name: token_windows(tokenizer, domain_text(name, cfg.split, root, tokenizer), cfg.windows, cfg.seq_len)
            for name in cfg.domains}


# Bumped whenever window_nll's arithmetic changes, so that cached NLLs of the old one are not paired
# with new ones (lpq.eval.ptq_quality's cache key). 2: cross-entropy over rows of the vocabulary.
WINDOW_NLL_VERSION = 2


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> list[float]:
    """Summed next-token NLL (nats) of each window (seq_len - 1 predictions each), float32 logits."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, ids.shape[0], batch_size):
        batch = ids[i:i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        # Rows of the vocabulary, not (batch, vocab, positions): the softmax runs along contiguous
        # memory, ~7x faster than the strided transpose on CPU (a sixth of a 135M model's window).
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        out += nll.view(batch.shape[0], -1).sum(-1).tolist()
    model.train(was_training)
    return out


def score_domains(model: nn.Module, windows: dict[str, torch.Tensor], batch_size: int) -> dict[str, list[float]]:
    """Per-window summed NLL of `model` on every domain."""
    return {name: window_nll(model, ids, batch_size) for name, ids in windows.items()}


def compare_domains(reference: dict[str, list[float]], candidate: dict[str, list[float]], seq_len: int,
                    bootstrap: int = 10000, seed: int = 0) -> dict[str, dict]:
    """Per domain: both perplexities, the candidate's relative perplexity increase in percent and its
    paired-bootstrap 95 % CI (windows resampled together for both models), and the window count."""
    out = {}
    for name in reference:
        if name not in candidate:
            continue
        ref, cand = reference[name], candidate[name]
        n = len(ref)
        tokens = n * (seq_len - 1)
        ppl_r, ppl_c = math.exp(sum(ref) / tokens), math.exp(sum(cand) / tokens)
        diff = torch.tensor(cand, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, n, (bootstrap, n), generator=g)
        # ppl ratio of a resample = exp(mean NLL difference per token over the resampled windows)
        boot = torch.expm1(diff[idx].sum(1) / tokens) * 100
        lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[name] = {"ppl_reference": ppl_r, "ppl": ppl_c, "ppl_increase_pct": 100 * (ppl_c / ppl_r - 1),
                     "ci95_low": lo, "ci95_high": hi, "windows": n}
    return out
