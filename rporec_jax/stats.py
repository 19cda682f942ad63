"""Confidence intervals and paired tests for per-instance metrics (NumPy only).

Per-instance NDCG@K / HR@K arrays come from `rporec_jax.eval.rank_metrics(ranks)`. Instances are the
resampling unit: a row's score is the mean over its instances, and two rows are compared instance by instance,
so both must have been measured on the same instances (`align` refuses otherwise).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Resampled values held at once (indices or signs): bounds memory at a few tens of MB for any n.
_CHUNK_ELEMENTS = 1 << 22


class Paired(NamedTuple):
    """Mean of a - b over n shared instances, its bootstrap CI [low, high] and the two-sided p-value."""

    diff: float
    low: float
    high: float
    p: float
    n: int


def _values(values) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"expected a non-empty 1-D array of per-instance values, got shape {values.shape}")
    return values


def _chunks(total: int, n: int):
    """Yields (start, size) blocks of `total` resamples of n values each, at most _CHUNK_ELEMENTS per block."""
    step = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, total, step):
        yield start, min(step, total - start)


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0):
    """Returns (mean, low, high): the mean of values [n] and its percentile-bootstrap interval at `confidence`
    (instances drawn with replacement `resamples` times)."""
    values = _values(values)
    n = len(values)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start, size in _chunks(resamples, n):
        # int32 indices are drawn and gathered faster than int64 ones (n is far below 2^31)
        means[start:start + size] = values[rng.integers(0, n, size=(size, n), dtype=np.int32)].mean(axis=1)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(values.mean()), float(low), float(high)


def sign_flip_p(diffs, resamples: int = 10_000, seed: int = 0) -> float:
    """Returns the two-sided p-value of a paired sign-flip permutation test on per-instance differences [n].

    Under H0 (the two rows are exchangeable on every instance) each difference's sign is a fair coin; p is the
    share of sign assignments whose |sum| reaches the observed |sum|. Exact (all 2^n assignments) when
    2^n <= resamples; otherwise Monte Carlo over `resamples` random assignments, (1 + hits) / (1 + resamples)
    so that p is never 0."""
    d = _values(diffs)
    n = len(d)
    observed = abs(d.sum())
    # Flipped sums are summed in another order than d.sum(): a rounding-level shortfall must still count.
    reach = observed - 1e-9 * np.abs(d).sum()
    if 2 ** n <= resamples:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ d) >= reach))
    rng = np.random.default_rng(seed)
    hits = 0
    for _, size in _chunks(resamples, n):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(size, n), dtype=np.int8)
        hits += int(np.sum(np.abs(signs @ d) >= reach))
    return (1 + hits) / (1 + resamples)


def align(keys_a, keys_b) -> tuple[np.ndarray, np.ndarray]:
    """Returns (order_a, order_b), int [n] each, putting both rows' instances in one (sorted-key) order.

    keys_a [n_a], keys_b [n_b]: one key per instance, any sortable dtype (e.g. a structured (user, position)
    array). Raises ValueError, naming the counts, unless both hold the same n distinct keys."""
    keys_a, keys_b = np.asarray(keys_a), np.asarray(keys_b)
    sorted_a, order_a = np.unique(keys_a, return_index=True)
    sorted_b, order_b = np.unique(keys_b, return_index=True)
    for name, keys, distinct in (("a", keys_a, sorted_a), ("b", keys_b, sorted_b)):
        if len(distinct) != len(keys):
            raise ValueError(f"row {name} holds {len(keys)} instances but only {len(distinct)} distinct keys")
    if len(sorted_a) != len(sorted_b) or not np.all(sorted_a == sorted_b):
        shared = len(np.intersect1d(sorted_a, sorted_b))
        raise ValueError(f"the rows were not measured on the same instances: {len(keys_a)} vs {len(keys_b)} "
                         f"instances, {shared} shared")
    return order_a, order_b


def paired_comparison(a, b, keys_a, keys_b, confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> Paired:
    """Returns `Paired` for row a minus row b: per-instance values a [n], b [n] with instance keys keys_a [n],
    keys_b [n] (matched by key, any order). The CI is the percentile bootstrap of the mean difference over
    instances (paired: an instance's two values are drawn together); p is `sign_flip_p` of the differences.
    Raises ValueError (see `align`) when the rows were not measured on the same instances."""
    a, b = _values(a), _values(b)
    for name, values, keys in (("a", a, keys_a), ("b", b, keys_b)):
        if len(values) != len(keys):
            raise ValueError(f"row {name}: {len(values)} values but {len(keys)} instance keys")
    order_a, order_b = align(keys_a, keys_b)
    d = a[order_a] - b[order_b]
    diff, low, high = bootstrap_ci(d, confidence, resamples, seed)
    return Paired(diff, low, high, sign_flip_p(d, resamples, seed), len(d))
