"""Most-popular baseline: every user gets the same ranking, items ordered by training interactions."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from jax.sharding import Mesh

from rporec_jax.data import PreparedDataset
from rporec_jax.data.pipeline import whole_split_loader
from rporec_jax.eval import EvalConfig, evaluate


def popularity_counts(ds: PreparedDataset, split: str = "train") -> np.ndarray:
    """Returns int64 [N+1] how often each item occurs among the distinct interactions seen in `split`; [0] = 0.

    An interaction is a (user, position) event appearing as a record's target or inside its history. Sliding
    windows repeat each event in up to W histories, so events are counted once, not once per window.
    """
    users, positions, items = [], [], []
    for r in ds.records(split):
        seq = [*r["history"], r["target"]]
        users.append(np.full(len(seq), r["user"], np.int64))
        positions.append(np.arange(r["position"] - len(seq) + 1, r["position"] + 1, dtype=np.int64))
        items.append(np.asarray(seq, np.int64))
    counts = np.zeros(ds.num_items + 1, np.int64)
    if not items:
        return counts
    users, positions, items = map(np.concatenate, (users, positions, items))
    _, first = np.unique(users * (positions.max() + 1) + positions, return_index=True)
    np.add.at(counts, items[first], 1)
    counts[0] = 0
    return counts


def popularity_scores(counts: np.ndarray) -> np.ndarray:
    """Returns float32 [N+1] scores with no ties: more counts first, equal counts by smaller id; [0] = -1.

    Scores are the reversed popularity order (N for the most popular item ... 1 for the least), so the
    pessimistic tie rule of `rporec_jax.eval` never applies and ties are broken by id, as documented.
    """
    n = len(counts) - 1
    order = np.lexsort((np.arange(1, n + 1), -np.asarray(counts[1:])))  # primary: -count, secondary: id
    scores = np.empty(n + 1, np.float32)
    scores[1 + order] = np.arange(n, 0, -1, dtype=np.float32)
    scores[0] = -1.0
    return scores


def evaluate_popularity(ds: PreparedDataset, split: str, config: EvalConfig = EvalConfig(),
                        counts: np.ndarray | None = None, batch_size: int = 256, mesh: Mesh | None = None,
                        strategy: str | Mapping[str, Any] = "dp") -> dict[str, float]:
    """Returns the full-ranking metrics dict of most-popular (train-split counts unless `counts`) on `split`."""
    scores = popularity_scores(popularity_counts(ds) if counts is None else counts)
    loader = whole_split_loader(ds, split, batch_size)
    # A rank-1 "embedding" (user vector 1, item vector = score) reuses the sharded vector path unchanged.
    ones = np.ones((batch_size, 1), np.float32)
    return evaluate(lambda batch: ones[: len(batch["target"])], loader, config, item_matrix=scores[:, None],
                    mesh=mesh, strategy=strategy)
