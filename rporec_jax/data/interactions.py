"""The source-independent form of a dataset: an item table with dense ids and per-user time-ordered sequences."""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterable, Sequence

import numpy as np

from rporec_jax.data.rows import RowReport

DUPLICATES = ("drop", "keep")


@dataclasses.dataclass
class Interactions:
    """Item table (id 0 = padding, real items 1..N) and each user's item sequence in time order.

    `item_keys[i]` / `item_texts[i]` describe dense item i (index 0 is the padding placeholder);
    `sequences[u]` is int32 [len_u] of dense ids; `timestamps[u]` is int64 [len_u] (None if the source has no time).
    """

    name: str
    item_keys: list[str]
    item_texts: list[str]
    user_keys: list[str]
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None
    report: RowReport
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """Returns N, the number of real items (ids 1..N)."""
        return len(self.item_keys) - 1

    @property
    def num_users(self) -> int:
        """Returns the number of users with at least one interaction."""
        return len(self.user_keys)

    @property
    def num_interactions(self) -> int:
        """Returns the total number of (user, item) events over all sequences."""
        return int(sum(len(s) for s in self.sequences))


def build_interactions(
    name: str,
    events: Iterable[tuple[Hashable, Hashable, int]],
    item_texts: dict[Hashable, str],
    report: RowReport,
    *,
    has_time: bool = True,
    item_sort_key: Callable[[Hashable], object] | None = None,
    keep_unused_items: bool = False,
    duplicates: str = "keep",
    extra: dict | None = None,
) -> Interactions:
    """Returns `Interactions` from (user, item, timestamp) events already validated by a source.

    Users keep their first-appearance order; each sequence is stably sorted by timestamp, so events with equal
    timestamps keep file order (the reference protocol; MovieLens has many ties). Items are numbered 1..N in
    `item_sort_key` order (default: sorted keys) so ids do not depend on file row order; items nobody interacted
    with are dropped (and counted) unless `keep_unused_items`. Events repeating an earlier (user, item, timestamp)
    are counted in `report.duplicate_rows` and dropped or kept per `duplicates` ('drop' | 'keep').
    """
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates={duplicates!r}; expected one of {DUPLICATES}")
    per_user: dict[Hashable, list[tuple[int, Hashable]]] = {}
    seen: set[tuple[Hashable, Hashable, int]] = set()
    for user, item, ts in events:
        if (user, item, ts) in seen:
            report.duplicate_rows += 1
            if duplicates == "drop":
                continue
        seen.add((user, item, ts))
        per_user.setdefault(user, []).append((ts, item))
    used = {item for evs in per_user.values() for _, item in evs}
    missing = used - item_texts.keys()
    if missing:
        raise ValueError(f"{name}: {len(missing)} interacted items have no item text, "
                         f"e.g. {sorted(map(str, missing))[:3]}")
    if keep_unused_items:
        used = set(item_texts)
    report.removed("items_without_interactions", len(item_texts) - len(used))
    keys = sorted(used, key=item_sort_key)
    dense = {k: i + 1 for i, k in enumerate(keys)}
    sequences, timestamps = [], []
    for evs in per_user.values():
        ts = np.asarray([t for t, _ in evs], dtype=np.int64)
        order = np.argsort(ts, kind="stable")
        sequences.append(np.asarray([dense[evs[j][1]] for j in order], dtype=np.int32))
        timestamps.append(ts[order])
    return Interactions(
        name=name,
        item_keys=[""] + [str(k) for k in keys],
        item_texts=[""] + [item_texts[k] for k in keys],
        user_keys=[str(u) for u in per_user],
        sequences=sequences,
        timestamps=timestamps if has_time else None,
        report=report,
        extra=dict(extra or {}),
    )


def interaction_stats(data: Interactions) -> dict:
    """Returns users, items, interactions and sequence-length quantiles of `data`."""
    lens = np.asarray([len(s) for s in data.sequences])
    return {
        "users": data.num_users,
        "items": data.num_items,
        "interactions": data.num_interactions,
        "seq_len": _quantiles(lens),
    }


def _quantiles(x: Sequence[int] | np.ndarray) -> dict:
    x = np.asarray(x)
    if x.size == 0:
        return {"min": 0, "p50": 0, "p90": 0, "max": 0, "mean": 0.0}
    return {
        "min": int(x.min()), "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
        "max": int(x.max()), "mean": round(float(x.mean()), 3),
    }
