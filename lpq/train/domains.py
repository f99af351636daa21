"""Evaluation on several text domains: per-window negative log-likelihoods and paired comparisons.

QAT on one corpus can hide a loss elsewhere, so `lpq train` scores every trained model on fixed token
windows of several domains and compares each quantized run with the reference run window by window
(a paired bootstrap: the window-to-window variance both models share cancels).

Built-in domains, each with two disjoint parts: `valid` (for choosing settings) and `test` (for the
final report; `lpq train` uses it by default):

* `wikitext2`: WikiText-2 `valid.txt` / `test.txt`;
* `gsm8k`: GSM8K *train* problems as plain text (question, then worked answer), records from the start
  (valid) or from the middle on (test);
* `chat`: GSM8K *train* problems in the tokenizer's chat template (user asks, assistant answers), taken
  from the end of the file backwards (valid) or from its middle backwards (test);
* `fortunes`: `calib/fortunes_calib.txt`, first half (valid) or second half (test).

The training corpus's own held-out blocks are added by `lpq train` as domain `train_heldout`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lpq.train.recipe import DomainEvalConfig, Split


def data_dir(cfg: DomainEvalConfig) -> Path:
    from lpq.eval.settings import EvalSettings, resolve_data_dir

    found = resolve_data_dir(EvalSettings(tasks=[], data_dir=cfg.data_dir, kl=False))
    if found is None:
        raise FileNotFoundError("domain_eval: no data folder: set domain_eval.data_dir or $LPQ_DATA_DIR to the "
                                "folder holding wikitext2/, gsm8k/ and calib/")
    if not found.is_dir():
        raise FileNotFoundError(f"domain_eval: data folder {found} does not exist (domain_eval.data_dir or "
                                f"$LPQ_DATA_DIR)")
    return found


def domain_file(name: str, split: Split, root: Path) -> Path:
    """The file a domain's text comes from."""
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


def domain_text(name: str, split: Split, root: Path, tokenizer) -> str:
    """The text of one domain's part; windows are cut from its start."""
    path = domain_file(name, split, root)
    if name == "wikitext2":
        return path.read_text(encoding="utf-8")
    if name == "fortunes":
        text = path.read_text(encoding="utf-8")
        half = len(text) // 2
        return text[:half] if split is Split.VALID else text[half:]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    mid = len(records) // 2
    if name == "gsm8k":
        part = records[:mid] if split is Split.VALID else records[mid:]
        return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in part)
    # chat: from the end backwards (valid) or from the middle backwards (test), so the two parts and
    # the plain gsm8k windows (which start at record 0 and at the middle) do not meet.
    part = records[mid:][::-1] if split is Split.VALID else records[:mid][::-1]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("domain_eval: domain 'chat' needs a tokenizer with a chat template")
    # 400 conversations are far more tokens than any window count here needs
    return "".join(tokenizer.apply_chat_template([{"role": "user", "content": r["question"]},
                                                  {"role": "assistant", "content": r["answer"]}], tokenize=False)
                   for r in part[:400])


def domain_windows(cfg: DomainEvalConfig, tokenizer) -> dict[str, torch.Tensor]:
    """(windows, seq_len) token ids per configured domain (fewer windows if a text is short)."""
    from lpq.eval.shift import token_windows

    check_domain_files(cfg)
    root = data_dir(cfg)
    return {name: token_windows(tokenizer, domain_text(name, cfg.split, root, tokenizer), cfg.windows, cfg.seq_len)
            for name in cfg.domains}


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
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out += nll.sum(-1).tolist()
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
