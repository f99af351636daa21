"""Paired comparison of a candidate against its baseline on the same items.

Both scores lpq reports are ratios of sums over items: accuracy = sum(correct) / n, and word
perplexity = exp(-sum(loglik) / sum(words)). The paired bootstrap resamples item indices once and
applies them to both models, so the item-to-item variance common to both cancels; this is what
makes a 0.5 % loss measurable on a few hundred items where two unpaired scores could not.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _score(values: np.ndarray, weights: np.ndarray, perplexity: bool) -> np.ndarray:
    ratio = values.sum(-1) / weights.sum(-1)
    return np.exp(-ratio) if perplexity else ratio


def rel_loss_pct(baseline: float, candidate: float, higher_is_better: bool = True) -> float | None:
    """Relative loss in percent of the baseline, positive when the candidate is worse; None if baseline is 0."""
    if baseline == 0:
        return None
    loss = (baseline - candidate) if higher_is_better else (candidate - baseline)
    return 100.0 * loss / abs(baseline)


def paired_compare(baseline: Sequence[float], candidate: Sequence[float], weights: Sequence[float] | None = None,
                   *, perplexity: bool = False, iters: int = 10000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Scores, relative loss and percentile-bootstrap CIs of a paired comparison.

    `baseline[i]` and `candidate[i]` are the two models' values on item i (correctness 0/1, or the
    log-likelihood of document i for perplexity, with `weights[i]` its word count). Returns
    baseline, quantized, diff (quantized - baseline) with its percentile CI diff_ci95_low/high,
    rel_loss_pct with ci95_low/high (the same CI in percent of the baseline, positive = worse) and n.
    """
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=np.float64)
    if b.shape != c.shape or b.shape != w.shape or b.ndim != 1:
        raise ValueError(f"paired values must be 1-D and the same length, got {b.shape}, {c.shape}, {w.shape}")
    n = b.size
    if n == 0:
        raise ValueError("no items to compare")
    higher = not perplexity
    sb, sc = float(_score(b, w, perplexity)), float(_score(c, w, perplexity))
    rng = np.random.default_rng(seed)
    diffs = []
    chunk = max(1, min(iters, 2_000_000 // n))      # bounds memory to ~16 MB of indices per chunk
    done = 0
    while done < iters:
        k = min(chunk, iters - done)
        idx = rng.integers(0, n, size=(k, n))
        diffs.append(_score(c[idx], w[idx], perplexity) - _score(b[idx], w[idx], perplexity))
        done += k
    d_lo, d_hi = (float(v) for v in np.percentile(np.concatenate(diffs), [100 * alpha / 2, 100 * (1 - alpha / 2)]))
    rel = rel_loss_pct(sb, sc, higher)
    # The relative CI is the difference's CI in percent of the baseline score (a loss is a negative
    # difference when higher is better). Resampled ratios would break on resamples whose baseline
    # score is 0, which small accuracy subsets do hit.
    if rel is None:
        r_lo = r_hi = None
    elif higher:
        r_lo, r_hi = -100.0 * d_hi / abs(sb), -100.0 * d_lo / abs(sb)
    else:
        r_lo, r_hi = 100.0 * d_lo / abs(sb), 100.0 * d_hi / abs(sb)
    return {"baseline": sb, "quantized": sc, "diff": sc - sb, "diff_ci95_low": d_lo, "diff_ci95_high": d_hi,
            "rel_loss_pct": rel, "ci95_low": r_lo, "ci95_high": r_hi, "n": n}


def agreement(baseline_predictions: Sequence, candidate_predictions: Sequence) -> float:
    """Fraction of items on which both models give the same answer (right or wrong)."""
    if len(baseline_predictions) != len(candidate_predictions) or not baseline_predictions:
        raise ValueError("agreement needs two equally long, non-empty prediction lists")
    same = sum(str(a) == str(b) for a, b in zip(baseline_predictions, candidate_predictions))
    return same / len(baseline_predictions)


def mean_abs_pct_loss(rel_losses: Sequence[float | None]) -> float | None:
    """The challenge metric: mean of |relative loss %| over tasks (None entries are skipped)."""
    vals = [abs(v) for v in rel_losses if v is not None]
    return sum(vals) / len(vals) if vals else None
