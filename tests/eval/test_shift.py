"""Perplexity and distribution shift on fixed token windows."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lpq.eval.shift import distribution_shift, perplexity, token_windows
from tests.eval.conftest import WORDS, perturbed

TEXT = " ".join(random.Random(0).choice(WORDS) for _ in range(700))


def test_windows_are_non_overlapping_prefixes(tiny_lm):
    _, tok = tiny_lm
    ids = token_windows(tok, TEXT, windows=5, seq_len=64)
    assert ids.shape == (5, 64)
    assert ids.reshape(-1).tolist() == tok(TEXT, add_special_tokens=False)["input_ids"][:320]
    assert token_windows(tok, TEXT, windows=100, seq_len=64).shape == (10, 64)   # only full windows
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, "w4 w5", windows=1, seq_len=64)


def test_perplexity_equals_the_models_own_loss(tiny_lm):
    model, tok = tiny_lm
    ids = token_windows(tok, TEXT, windows=4, seq_len=64)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert perplexity(model, tok, TEXT, windows=4, seq_len=64, batch_size=3) == pytest.approx(math.exp(loss), rel=1e-5)


def test_distribution_shift_of_a_model_against_itself_is_zero(tiny_lm):
    model, tok = tiny_lm
    r = distribution_shift(model, model, tok, TEXT, windows=3, seq_len=64)
    assert r["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0
    assert r["baseline_ppl"] == pytest.approx(r["candidate_ppl"])
    assert len(r["kl_per_window"]) == r["windows"] == 3


@pytest.mark.parametrize("rows", [None, 7])
def test_distribution_shift_matches_a_direct_computation(tiny_lm, rows, monkeypatch):
    """Also with softmax slices that straddle windows (7 positions at a time, windows of 64)."""
    from lpq.eval import shift

    if rows:
        monkeypatch.setattr(shift, "KL_ROWS", rows)
    model, tok = tiny_lm
    cand = perturbed(model, scale=0.05)
    r = distribution_shift(model, cand, tok, TEXT, windows=3, seq_len=64, batch_size=2)
    ids = token_windows(tok, TEXT, windows=3, seq_len=64)
    with torch.no_grad():
        lb = model(input_ids=ids).logits.log_softmax(-1)
        lc = cand(input_ids=ids).logits.log_softmax(-1)
    kl = F.kl_div(lc, lb, log_target=True, reduction="none").sum(-1)   # KL(baseline || candidate)
    assert r["kl_div"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert r["top1_agreement"] == pytest.approx((lb.argmax(-1) == lc.argmax(-1)).float().mean().item())
    assert r["kl_div"] > 0 and r["top1_agreement"] < 1
    assert r["baseline_ppl"] == pytest.approx(perplexity(model, tok, TEXT, windows=3, seq_len=64), rel=1e-5)
