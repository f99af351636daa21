"""Fast LLM quality checks for PTQ: perplexity, KL(baseline || quantized) and top-1 agreement.

Windows are the first `windows` non-overlapping `seq_len`-token windows of the whole tokenized text.
Both models run window by window, so only one window's logits are alive at a time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def eval_windows(tokenizer, text: str, windows: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(windows, ids.numel() // seq_len)
    if n < 1:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def compare(baseline, candidate, windows: torch.Tensor, desc: str = "eval") -> dict[str, float]:
    """{'baseline_ppl', 'ppl', 'kl_div', 'top1_agreement'} over the windows (candidate may be None)."""
    nll_b = nll_c = kl = agree = 0.0
    count = 0
    for w in tqdm(windows, desc=desc, unit="win"):
        x = w.unsqueeze(0)
        lb = baseline(input_ids=x, use_cache=False).logits[0, :-1].float()
        target = x[0, 1:]
        lpb = F.log_softmax(lb, -1)
        nll_b += float(-lpb.gather(1, target[:, None]).sum())
        if candidate is not None:
            lc = candidate(input_ids=x, use_cache=False).logits[0, :-1].float()
            lpc = F.log_softmax(lc, -1)
            nll_c += float(-lpc.gather(1, target[:, None]).sum())
            kl += float((lpb.exp() * (lpb - lpc)).sum())
            agree += float((lb.argmax(-1) == lc.argmax(-1)).sum())
        count += target.numel()
    out = {"baseline_ppl": math.exp(nll_b / count)}
    if candidate is not None:
        out.update(ppl=math.exp(nll_c / count), kl_div=kl / count, top1_agreement=agree / count)
    return out
