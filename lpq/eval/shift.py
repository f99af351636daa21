"""Perplexity and next-token distribution shift on fixed token windows of a text.

Both cut the text into non-overlapping windows of `seq_len` token ids (the first `windows` of them)
and run a batch of windows per forward. The distribution shift compares the two models' full
next-token distributions position by position, which moves long before any accuracy does on a
small model.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def token_windows(tokenizer, text: str, windows: int, seq_len: int) -> torch.Tensor:
    """(w, seq_len) int64 token ids: the first min(windows, available) full windows of `text`."""
    if windows < 1 or seq_len < 2:
        raise ValueError("need windows >= 1 and seq_len >= 2")
    need = windows * seq_len
    # Tokenizing a 1 MB file takes seconds; a prefix is enough unless the text is dense in tokens.
    chars = need * 8
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    w = min(windows, len(ids) // seq_len)
    if w == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[:w * seq_len], dtype=torch.long).view(w, seq_len)


def _batches(ids: torch.Tensor, batch_size: int, desc: str) -> Iterator[torch.Tensor]:
    from tqdm.auto import tqdm

    for i in tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        yield ids[i:i + batch_size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokenizer, text: str, windows: int = 40, seq_len: int = 512, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the first `windows` non-overlapping windows of `seq_len` tokens."""
    ids = token_windows(tokenizer, text, windows, seq_len)
    nll, count = 0.0, 0
    for batch in _batches(ids, batch_size, "perplexity"):
        batch = batch.to(_device(model))
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


# Positions whose (vocabulary-wide) softmaxes are computed at once: a whole batch's float32 log-softmaxes
# and their KL intermediates are 0.2 GB each for 2 x 512 positions of SmolLM2's 49,152 tokens and 0.6 GB
# for Qwen3's 151,936.
KL_ROWS = 128


def log_softmax_slices(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(positions, log_softmax(a), log_softmax(b)) in float32 for KL_ROWS positions at a time of two
    (..., vocabulary) logits tensors of one shape, flattened to positions."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    for i in range(0, a.shape[0], KL_ROWS):
        sl = slice(i, i + KL_ROWS)
        yield sl, a[sl].float().log_softmax(-1), b[sl].float().log_softmax(-1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def distribution_shift(baseline, candidate, tokenizer, text: str, windows: int = 40, seq_len: int = 512,
                       batch_size: int = 2) -> dict:
    """Mean per-token KL(baseline || candidate) in nats and top-1 agreement of the next-token distributions.

    Also returns both models' perplexity on the same windows and the per-window KL, since the logits
    are at hand. Each batch of windows runs through both models before the next one, so only one
    batch of logits per model is ever held, and its softmaxes are taken KL_ROWS positions at a time.
    """
    ids = token_windows(tokenizer, text, windows, seq_len)
    kl_sum, agree, nll_b, nll_c, positions = 0.0, 0, 0.0, 0.0, 0
    per_window: list[float] = []
    for batch in _batches(ids, batch_size, "distribution shift"):
        logits_b = baseline(input_ids=batch.to(_device(baseline))).logits
        logits_c = candidate(input_ids=batch.to(_device(candidate))).logits.to(logits_b.device)
        # The next token of each position; the last position of a window has none (-1).
        target = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -1)], 1).reshape(-1).to(logits_b.device)
        kl = torch.empty(target.shape[0], device=logits_b.device)
        for sl, lb, lc in log_softmax_slices(logits_b, logits_c):
            kl[sl] = kl_rows(lb, lc)
            agree += (lb.argmax(-1) == lc.argmax(-1)).sum().item()
            t = target[sl]
            scored = t >= 0
            nll_b -= lb[scored].gather(-1, t[scored].unsqueeze(-1)).sum().item()
            nll_c -= lc[scored].gather(-1, t[scored].unsqueeze(-1)).sum().item()
        kl = kl.view(batch.shape)
        per_window += kl.mean(-1).tolist()
        kl_sum += kl.sum().item()
        positions += kl.numel()
    scored = ids.shape[0] * (seq_len - 1)
    return {"kl_div": kl_sum / positions, "top1_agreement": agree / positions,
            "baseline_ppl": math.exp(nll_b / scored), "candidate_ppl": math.exp(nll_c / scored),
            "windows": ids.shape[0], "seq_len": seq_len, "kl_per_window": per_window}
