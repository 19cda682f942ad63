"""Sliding-window instances and the temporal / leave-one-out splits."""

import numpy as np
import pytest

from rporec_jax.data import RowReport, SplitConfig, SyntheticConfig, build_interactions, make_instances
from rporec_jax.data.splits import instance_stats


def _toy():
    # u0 has a timestamp tie (b, c at t=5) that the stable sort must keep in file order.
    events = [("u0", "a", 1), ("u0", "b", 5), ("u0", "c", 5), ("u1", "c", 2), ("u1", "a", 9), ("u0", "d", 7),
              ("u1", "b", 3), ("u2", "d", 4)]
    return build_interactions("toy", events, {k: k for k in "abcde"}, RowReport())


def test_dense_ids_and_stable_order():
    d = _toy()
    assert d.item_keys == ["", "a", "b", "c", "d"]  # 'e' has no interaction: dropped and counted
    assert d.report.filters["items_without_interactions"] == 1
    assert d.sequences[0].tolist() == [1, 2, 3, 4] and d.timestamps[0].tolist() == [1, 5, 5, 7]
    assert d.sequences[1].tolist() == [3, 2, 1]


def test_windows_and_leave_one_out():
    d = _toy()
    inst = make_instances(d, SplitConfig(kind="leave_one_out", window=2))
    assert len(inst) == 3 + 2 + 0
    rows = [(int(inst.user[k]), inst.history[k, : inst.history_len[k]].tolist(), int(inst.target[k]),
             int(inst.split[k])) for k in range(len(inst))]
    assert rows == [(0, [1], 2, 0), (0, [1, 2], 3, 1), (0, [2, 3], 4, 2), (1, [3], 2, 1), (1, [3, 2], 1, 2)]
    assert inst.history[0].tolist() == [1, 0]  # right-padded with the padding id


@pytest.mark.parametrize("kind", ["temporal", "leave_one_out"])
def test_split_invariants_on_synthetic(kind):
    data = SyntheticConfig(num_users=150, seed=1).load()
    inst = make_instances(data, SplitConfig(kind=kind, window=5))
    sizes = [len(inst.select(s)) for s in ("train", "valid", "test")]
    assert sum(sizes) == len(inst) == data.num_interactions - data.num_users
    for k in range(len(inst)):
        seq, i = data.sequences[inst.user[k]], inst.position[k]
        h = inst.history[k, : inst.history_len[k]]
        # The history is exactly the (up to) W items before the target, never the target's future.
        assert h.tolist() == seq[max(0, i - 5) : i].tolist() and inst.target[k] == seq[i]
        assert np.all(inst.history[k, inst.history_len[k] :] == 0) and np.all(h > 0)
        assert np.all(data.timestamps[inst.user[k]][max(0, i - 5) : i] <= inst.timestamp[k])
    if kind == "temporal":
        ts = {s: inst.timestamp[inst.select(s)] for s in ("train", "valid", "test")}
        assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()
        assert sizes == [int(len(inst) * 0.8), int(len(inst) * 0.9) - int(len(inst) * 0.8),
                         len(inst) - int(len(inst) * 0.9)]
    else:
        assert sizes[1] == sizes[2] == data.num_users
        for s, back in (("test", 1), ("valid", 2)):
            idx = inst.select(s)
            lens = np.asarray([len(data.sequences[u]) for u in inst.user[idx]])
            assert np.all(inst.position[idx] == lens - back)
    stats = instance_stats(inst)
    assert [stats[s]["instances"] for s in ("train", "valid", "test")] == sizes


def test_bad_split_configs():
    with pytest.raises(ValueError, match="temporal"):
        SplitConfig(kind="random")
    with pytest.raises(ValueError, match="sum"):
        SplitConfig(ratios=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("kind", ["temporal", "leave_one_out"])
def test_limited_splits_spread_over_users(kind):
    """The first N instances of a split (what every limited stage reads) are the latest instances of
    min(N, users) distinct users, then every user's second latest, and so on."""
    data = SyntheticConfig(num_users=40, seed=2).load()
    inst = make_instances(data, SplitConfig(kind=kind, window=5))
    for s in ("train", "valid", "test"):
        idx = inst.select(s)
        assert sorted(idx.tolist()) == np.flatnonzero(inst.split == ("train", "valid", "test").index(s)).tolist()
        users = inst.user[idx]
        n_users = len(set(users.tolist()))
        assert len(set(users[:n_users].tolist())) == n_users  # the first round has every user once
        assert users[:n_users].tolist() == sorted(users[:n_users].tolist())
        for u in set(users.tolist()):
            assert np.all(np.diff(inst.position[idx[users == u]]) < 0)  # each user's latest first
    assert len(set(inst.user[inst.select("train")[:30]].tolist())) == 30
