"""rporec_jax.stats: bootstrap intervals and the paired sign-flip test, checked against analytic and SciPy
references."""

import numpy as np
import pytest
from scipy import stats as sps

from rporec_jax.stats import Paired, align, bootstrap_ci, paired_comparison, sign_flip_p


def test_bootstrap_ci_of_hit_rates_matches_the_normal_approximation():
    n, hits = 2000, 200  # HR@10 = 0.1 on 2,000 users
    values = np.random.default_rng(1).permutation(np.r_[np.ones(hits), np.zeros(n - hits)])
    mean, low, high = bootstrap_ci(values)
    half = sps.norm.ppf(0.975) * np.sqrt(0.1 * 0.9 / n)  # 0.0131
    assert mean == 0.1
    assert low == pytest.approx(0.1 - half, abs=8e-4) and high == pytest.approx(0.1 + half, abs=8e-4)
    # the level is honoured: a 90% interval is narrower by the ratio of the normal quantiles
    _, low90, high90 = bootstrap_ci(values, confidence=0.90)
    assert (high90 - low90) / (high - low) == pytest.approx(sps.norm.ppf(0.95) / sps.norm.ppf(0.975), abs=0.05)


def test_bootstrap_ci_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 400, 0
    for t in range(trials):
        _, low, high = bootstrap_ci(rng.normal(0.3, 1.0, size=200), resamples=2000, seed=t)
        covered += low <= 0.3 <= high
    # binomial sd of the share over 400 trials is 0.011
    assert 0.92 <= covered / trials <= 0.98, covered / trials


def test_sign_flip_p_is_scipys_exact_paired_permutation_p():
    rng = np.random.default_rng(2)
    for shift in (0.0, 0.3, 0.8):
        a, b = rng.normal(shift, 1.0, 10), rng.normal(0.0, 1.0, 10)
        ref = sps.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                   permutation_type="samples", n_resamples=np.inf)
        assert sign_flip_p(a - b) == pytest.approx(ref.pvalue, abs=1e-12), shift


def test_sign_flip_p_monte_carlo_agrees_with_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.12, 1.0, 300), rng.normal(0.0, 1.0, 300)
    ref = sps.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                               n_resamples=20_000, random_state=0)
    assert 0.01 < ref.pvalue < 0.5
    assert sign_flip_p(a - b) == pytest.approx(ref.pvalue, abs=0.015)


def test_same_seed_repeats_and_another_seed_differs():
    values = np.random.default_rng(4).random(500)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7)[1] != bootstrap_ci(values, seed=8)[1]
    a, b, keys = values, values[::-1], np.arange(500)
    assert paired_comparison(a, b, keys, keys, seed=7) == paired_comparison(a, b, keys, keys, seed=7)


def test_no_difference_gives_p_one_and_a_large_shift_gives_p_below_one_in_a_thousand():
    rng = np.random.default_rng(5)
    keys = np.arange(2000)
    b = rng.random(2000)
    assert paired_comparison(b, b, keys, keys) == Paired(0.0, 0.0, 0.0, 1.0, 2000)
    mirrored = np.r_[b[:1000], -b[:1000]]  # differences cancel exactly: mean 0
    assert sign_flip_p(mirrored) == 1.0 and sign_flip_p(np.zeros(8)) == 1.0  # Monte Carlo and exact
    a = b + 0.05 + rng.normal(0.0, 0.01, 2000)
    res = paired_comparison(a, b, keys, keys)
    assert res.p == 1 / 10_001 and res.low < 0.05 < res.high and res.low > 0.04  # no flip reaches it; p never 0
    assert res.diff == pytest.approx(np.mean(a - b))
    # a weak shift on few instances is not significant
    assert paired_comparison(b[:20] + 0.01, b[:20][::-1], keys[:20], keys[:20]).p > 0.05


def test_instances_are_matched_by_key_and_other_instances_are_refused():
    dtype = [("user", np.int64), ("position", np.int64)]
    keys = np.array([(u, u % 3) for u in range(10)], dtype)
    rng = np.random.default_rng(6)
    a, b = rng.random(10), rng.random(10)
    perm = rng.permutation(10)
    assert paired_comparison(a, b[perm], keys, keys[perm]) == paired_comparison(a, b, keys, keys)
    other = keys.copy()
    other[0] = (0, 5)  # same users and count, one other position
    with pytest.raises(ValueError, match="not measured on the same instances: 10 vs 10 instances, 9 shared"):
        paired_comparison(a, b, keys, other)
    with pytest.raises(ValueError, match="10 vs 8 instances, 8 shared"):
        paired_comparison(a, b[:8], keys, keys[:8])
    with pytest.raises(ValueError, match="10 instances but only 9 distinct keys"):
        align(np.r_[keys[:9], keys[:1]], keys)
    with pytest.raises(ValueError, match="9 values but 10 instance keys"):
        paired_comparison(a[:9], b, keys, keys)
