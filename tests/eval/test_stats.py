"""Paired bootstrap on synthetic paired data with a known answer."""
import math

import numpy as np
import pytest

from lpq.eval.stats import agreement, mean_abs_pct_loss, paired_compare, rel_loss_pct


def _known_pairs():
    # 1000 items, baseline right on 600. The candidate loses 50 of those and gains 20 others:
    # diff = -0.03 exactly; per-item d has var 0.07 - 0.03^2, so SE = sqrt(0.0691 / 1000).
    base = np.zeros(1000)
    base[:600] = 1
    cand = base.copy()
    cand[:50] = 0
    cand[600:620] = 1
    return base, cand


def test_paired_bootstrap_matches_the_normal_approximation():
    base, cand = _known_pairs()
    r = paired_compare(base, cand, iters=20000, seed=0)
    assert r["baseline"] == pytest.approx(0.6) and r["quantized"] == pytest.approx(0.57)
    assert r["diff"] == pytest.approx(-0.03)
    assert r["rel_loss_pct"] == pytest.approx(5.0)
    se = math.sqrt((0.07 - 0.03 ** 2) / 1000)
    assert r["diff_ci95_low"] == pytest.approx(-0.03 - 1.96 * se, abs=0.002)
    assert r["diff_ci95_high"] == pytest.approx(-0.03 + 1.96 * se, abs=0.002)
    # The relative CI is that CI in percent of the baseline; it excludes zero: the loss is real.
    assert r["ci95_low"] == pytest.approx(-100 * r["diff_ci95_high"] / 0.6)
    assert r["ci95_high"] == pytest.approx(-100 * r["diff_ci95_low"] / 0.6)
    assert 0 < r["ci95_low"] < 5.0 < r["ci95_high"]
    assert r["n"] == 1000


def test_pairing_is_much_tighter_than_unpaired():
    base, cand = _known_pairs()
    r = paired_compare(base, cand, iters=5000, seed=0)
    unpaired_se = math.sqrt(0.6 * 0.4 / 1000 + 0.57 * 0.43 / 1000)
    assert (r["diff_ci95_high"] - r["diff_ci95_low"]) < 0.5 * (2 * 1.96 * unpaired_se)


def test_identical_models_have_a_zero_width_ci_and_seeded_resampling():
    base, _ = _known_pairs()
    r = paired_compare(base, base, iters=1000, seed=3)
    assert (r["rel_loss_pct"], r["ci95_low"], r["ci95_high"]) == (0.0, 0.0, 0.0)
    _, cand = _known_pairs()
    assert paired_compare(base, cand, iters=500, seed=7) == paired_compare(base, cand, iters=500, seed=7)


def test_perplexity_is_a_ratio_of_sums_and_worse_is_positive():
    ll_b = np.array([-100.0, -200.0, -50.0])
    words = np.array([40, 90, 20])
    ll_c = ll_b * 1.1                                          # lower likelihood: higher perplexity
    r = paired_compare(ll_b, ll_c, words, perplexity=True, iters=2000)
    ppl_b, ppl_c = math.exp(350 / 150), math.exp(385 / 150)
    assert r["baseline"] == pytest.approx(ppl_b) and r["quantized"] == pytest.approx(ppl_c)
    assert r["rel_loss_pct"] == pytest.approx(100 * (ppl_c - ppl_b) / ppl_b)
    assert r["rel_loss_pct"] > 0 and r["ci95_low"] > 0


def test_rel_loss_agreement_and_mean():
    assert rel_loss_pct(0.5, 0.45) == pytest.approx(10.0)
    assert rel_loss_pct(10.0, 11.0, higher_is_better=False) == pytest.approx(10.0)
    assert rel_loss_pct(0.0, 0.1) is None
    assert paired_compare([0, 0], [0, 1], iters=100)["rel_loss_pct"] is None
    small = paired_compare([1, 0, 0, 0, 0], [1, 1, 0, 0, 0], iters=2000)   # resamples with baseline 0 exist
    assert small["ci95_low"] is not None and small["ci95_low"] <= small["rel_loss_pct"] <= small["ci95_high"]
    assert agreement([0, 1, 2, 3], [0, 1, 3, 3]) == 0.75
    assert agreement(["18", "7"], ["18", "7"]) == 1.0
    assert mean_abs_pct_loss([1.0, -3.0, None]) == 2.0
    assert mean_abs_pct_loss([None]) is None
    with pytest.raises(ValueError):
        paired_compare([1, 0], [1], iters=10)
    with pytest.raises(ValueError):
        agreement([], [])
