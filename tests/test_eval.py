"""Full-ranking metrics: hand-computed pessimistic ranks, padding/history/padded-row handling, top-k, sharding."""

import math

import jax
import numpy as np
import pytest

from rporec_jax import sharding as shd
from rporec_jax.eval import (EvalConfig, MetricSums, compute_metrics, evaluate, items_mesh_axes, rank_metrics,
                             ranks_from_scores, shard_item_matrix, target_ranks, top_k_items)

# N = 5 real items (columns 1..5); column 0 is padding and holds the largest score on purpose.
SCORES = np.array([
    [9.0, 0.5, 0.2, 0.9, 0.1, 0.3],  # target 3 scores highest among real items -> rank 1
    [9.0, 0.5, 0.2, 0.9, 0.1, 0.3],  # target 2: 0.5, 0.9, 0.3 are higher -> rank 4
    [9.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # target 2 ties with items 1 and 3 -> pessimistic rank 3
    [9.0, 7.0, 7.0, 7.0, 7.0, 7.0],  # constant scorer -> every target ranks last (5)
], np.float32)
TARGETS = np.array([3, 2, 2, 4], np.int32)
RANKS = np.array([1, 4, 3, 5])


def _brute_ranks(scores, targets, num_items, exclude=None):
    """Pessimistic rank by an explicit loop over items (independent of the vectorised code)."""
    out = []
    for b, t in enumerate(targets):
        banned = set() if exclude is None else {int(x) for x in exclude[b] if x != t}
        st = scores[b, t]
        r = 1
        for j in range(1, num_items + 1):
            if j == t or j in banned:
                continue
            r += scores[b, j] >= st
        out.append(r)
    return np.array(out)


def test_ranks_hand_computed_with_ties_and_padding():
    ranks = np.asarray(ranks_from_scores(SCORES, TARGETS, num_items=5))
    np.testing.assert_array_equal(ranks, RANKS)
    np.testing.assert_array_equal(_brute_ranks(SCORES, TARGETS, 5), RANKS)


def test_metric_values_from_ranks():
    m = compute_metrics(RANKS, ks=(1, 3, 5))
    assert m["count"] == 4
    assert m["hr@1"] == pytest.approx(1 / 4) and m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["hr@3"] == pytest.approx(2 / 4)
    assert m["ndcg@3"] == pytest.approx((1.0 + 1 / math.log2(4)) / 4)
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["ndcg@5"] == pytest.approx((1.0 + 1 / math.log2(5) + 1 / math.log2(4) + 1 / math.log2(6)) / 4)


def test_k_larger_than_catalogue():
    m = compute_metrics(RANKS, ks=(10, 1000))
    # Every target is somewhere in a 5-item catalogue: hits are certain, NDCG is still rank-discounted.
    assert m["hr@10"] == m["hr@1000"] == 1.0
    assert m["ndcg@1000"] == pytest.approx(np.mean(1 / np.log2(RANKS + 1.0)))


def test_constant_scorer_ranks_last():
    n = 50
    ranks = np.asarray(ranks_from_scores(np.zeros((3, n + 1), np.float32), np.array([1, 25, 50]), num_items=n))
    np.testing.assert_array_equal(ranks, [n, n, n])
    assert compute_metrics(ranks)["ndcg@20"] == 0.0


def test_nan_scores_rank_last_and_extra_columns_ignored():
    s = SCORES.copy()
    s[0, 3] = np.nan  # a NaN target must not look like a perfect prediction
    s[1, 1] = np.nan  # a NaN competitor counts as -inf: it no longer beats the target
    ranks = np.asarray(ranks_from_scores(s, TARGETS, num_items=5))
    np.testing.assert_array_equal(ranks, [5, 3, 3, 5])
    # Two extra columns beyond N (sharding padding) with huge scores change nothing.
    wide = np.concatenate([SCORES, np.full((4, 2), 99.0, np.float32)], axis=1)
    np.testing.assert_array_equal(np.asarray(ranks_from_scores(wide, TARGETS, num_items=5)), RANKS)
    with pytest.raises(ValueError, match="at least num_items"):
        ranks_from_scores(SCORES, TARGETS, num_items=6)


def test_history_exclusion_keeps_target():
    exclude = np.array([[0, 0, 0], [1, 3, 0], [2, 1, 0], [4, 2, 3]], np.int32)
    ranks = np.asarray(ranks_from_scores(SCORES, TARGETS, num_items=5, exclude=exclude))
    # row 1: items 1 and 3 removed -> only item 5 (0.3) beats 0.2 -> rank 2
    # row 2: item 1 removed, target 2 is in the history but stays ranked -> ties only with item 3 -> rank 2
    # row 3: items 2, 3 removed (target 4 stays) -> items 1 and 5 tie -> rank 3
    np.testing.assert_array_equal(ranks, [1, 2, 2, 3])
    np.testing.assert_array_equal(_brute_ranks(SCORES, TARGETS, 5, exclude), [1, 2, 2, 3])


def test_random_scores_match_brute_force():
    rng = np.random.default_rng(0)
    n = 40
    scores = rng.integers(0, 6, (64, n + 1)).astype(np.float32)  # few distinct values: many ties
    targets = rng.integers(1, n + 1, 64)
    exclude = rng.integers(0, n + 1, (64, 7))
    np.testing.assert_array_equal(np.asarray(ranks_from_scores(scores, targets, n)), _brute_ranks(scores, targets, n))
    np.testing.assert_array_equal(np.asarray(ranks_from_scores(scores, targets, n, exclude)),
                                  _brute_ranks(scores, targets, n, exclude))


def test_metric_sums_ignore_padded_rows():
    acc = MetricSums(ks=(1,))
    acc.add(np.array([1, 1, 9]), np.array([True, False, True]))
    acc.add(np.array([1]), None)
    assert acc.result() == {"ndcg@1": pytest.approx(2 / 3), "hr@1": pytest.approx(2 / 3), "count": 3}
    with pytest.raises(ValueError, match="expected the ranks' shape"):
        acc.add(np.array([1, 2]), np.array([True]))
    assert MetricSums().result()["count"] == 0


def _batches():
    # Second batch: the last row is loader padding (valid False) with a target the model gets right.
    return [
        {"target": TARGETS[:2], "valid": np.array([True, True]), "history": np.zeros((2, 3), np.int32), "row": [0, 1]},
        {"target": np.array([2, 3]), "valid": np.array([True, False]), "history": np.zeros((2, 3), np.int32),
         "row": [2, 0]},
    ]


def test_evaluate_with_score_fn_ignores_padded_rows():
    m = evaluate(lambda b: SCORES[b["row"]], _batches(), EvalConfig(ks=(1, 5)))
    assert m["count"] == 3
    assert m["hr@1"] == pytest.approx(1 / 3) and m["ndcg@5"] == pytest.approx(
        (1 + 1 / math.log2(5) + 1 / math.log2(4)) / 3)
    bad = _batches()
    bad[1]["valid"] = np.array([True, True])
    bad[1]["target"] = np.array([2, 0])  # a valid row with the padding id as target is an error
    with pytest.raises(ValueError, match="batch 1 row 1: target 0 is not a real item id in 1..5"):
        evaluate(lambda b: SCORES[b["row"]], bad)
    no_hist = [{k: v for k, v in b.items() if k != "history"} for b in _batches()]
    with pytest.raises(KeyError, match="exclude_history needs a 'history'"):
        evaluate(lambda b: SCORES[b["row"]], no_hist, EvalConfig(exclude_history=True))


def test_evaluate_vector_path_equals_score_path(mesh1):
    rng = np.random.default_rng(1)
    users, items = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(31, 8)).astype(np.float32)
    batches = [{"target": rng.integers(1, 31, 10), "valid": np.arange(10) < 10 - i, "u": users[10 * i: 10 * i + 10],
                "history": rng.integers(0, 31, (10, 4))} for i in range(2)]
    for cfg in (EvalConfig(), EvalConfig(exclude_history=True)):
        by_scores = evaluate(lambda b: b["u"] @ items.T, batches, cfg)
        by_vectors = evaluate(lambda b: b["u"], batches, cfg, item_matrix=items, mesh=mesh1)
        assert by_scores["count"] == by_vectors["count"] == 19
        for k, v in by_scores.items():
            assert by_vectors[k] == pytest.approx(v, abs=1e-12), k


def test_top_k_items():
    users = np.eye(2, 3, dtype=np.float32)  # user 0 scores = column 0 of items, user 1 = column 1
    items = np.array([[100, 100, 0], [1, 5, 0], [3, 5, 0], [3, 1, 0], [2, 0, 0]], np.float32)  # row 0 = padding
    np.testing.assert_array_equal(np.asarray(top_k_items(users, items, 3)), [[2, 3, 4], [1, 2, 3]])  # ties: id
    excl = np.array([[2, 0], [1, 0]])
    np.testing.assert_array_equal(np.asarray(top_k_items(users, items, 4, exclude=excl)), [[3, 4, 1, 0], [2, 3, 4, 0]])
    np.testing.assert_array_equal(np.asarray(top_k_items(users, items, 2, num_items=3)), [[2, 3], [1, 2]])
    with pytest.raises(ValueError, match="k must be in 1..num_items=4"):
        top_k_items(users, items, 5)


MESHES = {"dp": shd.MeshConfig(data=8), "fsdp": shd.MeshConfig(data=1, fsdp=8),
          "fsdp_tp": shd.MeshConfig(data=2, fsdp=2, tp=2)}


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(2)
    n, d = 101, 16  # N + 1 = 102 rows: not a multiple of 8, so the item matrix needs padding
    items = rng.normal(size=(n + 1, d)).astype(np.float32)
    items[7] = items[9]  # exact duplicate items: ties must resolve the same way on every layout
    users = rng.normal(size=(45, d)).astype(np.float32)
    batches = [{"target": rng.integers(1, n + 1, 15), "valid": np.arange(15) < (15 if i < 2 else 11),
                "history": rng.integers(0, n + 1, (15, 6)), "u": users[15 * i: 15 * i + 15]} for i in range(3)]
    batches[0]["target"][:3] = [7, 9, 7]
    return items, users, batches


@pytest.mark.parametrize("strategy", sorted(MESHES))
def test_sharded_evaluation_equals_one_device(strategy, problem, mesh1):
    items, users, batches = problem
    mesh = shd.make_mesh(MESHES[strategy])
    placed = shard_item_matrix(items, mesh, strategy)
    axes = items_mesh_axes(strategy)
    n_shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    assert placed.shape[0] % n_shards == 0 and placed.shape[0] >= items.shape[0]
    assert {s.data.shape[0] for s in placed.addressable_shards} == {placed.shape[0] // n_shards}
    cfg = EvalConfig(exclude_history=True)
    one = evaluate(lambda b: b["u"], batches, cfg, item_matrix=items, mesh=mesh1)
    many = evaluate(lambda b: b["u"], batches, cfg, item_matrix=items, mesh=mesh, strategy=strategy)
    assert one == many and one["count"] == 41
    t, ex = batches[0]["target"], batches[0]["history"]
    np.testing.assert_array_equal(np.asarray(target_ranks(batches[0]["u"][:8], placed, t[:8], ex[:8], num_items=101,
                                                          mesh=mesh, strategy=strategy)),
                                  np.asarray(target_ranks(batches[0]["u"][:8], items, t[:8], ex[:8])))
    u = jax.device_put(users[:8], shd.batch_sharding(mesh))
    np.testing.assert_array_equal(np.asarray(top_k_items(u, placed, 10, num_items=101)),
                                  np.asarray(top_k_items(users[:8], items, 10)))


def test_rank_metrics_shapes():
    m = rank_metrics(np.array([1, 2, 30]), ks=(2,))
    np.testing.assert_allclose(m["ndcg@2"], [1.0, 1 / math.log2(3), 0.0])
    np.testing.assert_array_equal(m["hr@2"], [1.0, 1.0, 0.0])
