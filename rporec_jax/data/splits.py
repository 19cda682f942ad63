"""Sliding-window instances (history -> next item) and the temporal / leave-one-out splits."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from rporec_jax.data.interactions import Interactions, _quantiles
from rporec_jax.data.ranges import Range, check_ranges

SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How instances are cut and split. `kind` is 'temporal' (global by target time) or 'leave_one_out'."""

    kind: str = "temporal"
    window: int = 20
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)

    RANGES: ClassVar[dict[str, Range]] = {"window": Range(1), "ratios": Range(0, 1)}

    def __post_init__(self):
        if self.kind not in ("temporal", "leave_one_out"):
            raise ValueError(f"split kind must be 'temporal' or 'leave_one_out', got {self.kind!r}")
        check_ranges(self)
        if len(self.ratios) != 3 or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"ratios must be 3 non-negative numbers summing to 1, got {self.ratios}")


@dataclasses.dataclass
class Instances:
    """All instances of one dataset, in a deterministic order.

    user [n] (index into `Interactions.user_keys`), position [n] (index of the target in the user's sequence),
    history [n, window] (oldest first, right-padded with 0), history_len [n], target [n],
    timestamp [n] (target time; the position for sources without time), split [n] (0 train, 1 valid, 2 test).
    """

    user: np.ndarray
    position: np.ndarray
    history: np.ndarray
    history_len: np.ndarray
    target: np.ndarray
    timestamp: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def select(self, split: str) -> np.ndarray:
        """Returns the int64 [n_split] indices of the instances in `split`, users interleaved: every user's
        latest instance (users in index order), then every user's second latest, and so on.

        Every stage reads "the first N instances" of a split when it is limited; in plain (user, position)
        order those came from one or two users (MovieLens-100K's first 48 train instances are users 0 and 1's
        sliding windows), so a limited run measured a couple of users. Interleaved, the first N instances
        come from min(N, users in the split) distinct users."""
        idx = np.flatnonzero(self.split == SPLITS.index(split))
        by_user = idx[np.lexsort((-self.position[idx], self.user[idx]))]  # per user, latest first
        user = self.user[by_user]
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
        rank = np.arange(len(user)) - np.repeat(starts, np.diff(np.r_[starts, len(user)]))
        return by_user[np.lexsort((user, rank))]


def make_instances(data: Interactions, cfg: SplitConfig) -> Instances:
    """Returns every (history = items[max(0, i-W):i], target = items[i]) for i >= 1 of every user, split per `cfg`."""
    if cfg.kind == "temporal" and data.timestamps is None:
        raise ValueError(f"{data.name}: temporal split needs timestamps; this source has none (use leave_one_out)")
    w = cfg.window
    users, positions = [], []
    for u, seq in enumerate(data.sequences):
        n = len(seq)
        if n >= 2:
            users.append(np.full(n - 1, u, dtype=np.int32))
            positions.append(np.arange(1, n, dtype=np.int32))
    user = np.concatenate(users) if users else np.zeros(0, np.int32)
    position = np.concatenate(positions) if positions else np.zeros(0, np.int32)
    n = len(user)
    history = np.zeros((n, w), dtype=np.int32)
    history_len = np.minimum(position, w).astype(np.int32)
    target = np.empty(n, dtype=np.int32)
    timestamp = np.empty(n, dtype=np.int64)
    for k in range(n):
        seq, i = data.sequences[user[k]], position[k]
        history[k, : history_len[k]] = seq[i - history_len[k] : i]
        target[k] = seq[i]
        timestamp[k] = data.timestamps[user[k]][i] if data.timestamps is not None else i
    split = np.zeros(n, dtype=np.int8)
    if cfg.kind == "temporal":
        # Stable sort: instances with equal target times keep (user order, position) order, so reruns agree.
        order = np.argsort(timestamp, kind="stable")
        n_train = int(n * cfg.ratios[0])
        n_valid = int(n * (cfg.ratios[0] + cfg.ratios[1])) - n_train
        split[order[n_train : n_train + n_valid]] = 1
        split[order[n_train + n_valid :]] = 2
    else:
        last = np.zeros(n, dtype=bool)
        last[:-1] = user[1:] != user[:-1]
        last[-1:] = True
        split[last] = 2
        second = np.zeros(n, dtype=bool)
        second[:-1] = last[1:] & (user[:-1] == user[1:])
        split[second] = 1
    return Instances(user, position, history, history_len, target, timestamp, split)


def instance_stats(inst: Instances) -> dict:
    """Returns instances per split and the history-length distribution per split."""
    out = {}
    for s in SPLITS:
        idx = inst.select(s)
        out[s] = {"instances": int(len(idx)), "history_len": _quantiles(inst.history_len[idx])}
    return out
