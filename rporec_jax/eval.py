"""Full-ranking evaluation: rank each target among ALL real items, NDCG@K and HR@K.

Item ids: 0 is padding and is never ranked; real items are 1..N. Score matrices may carry extra columns beyond
N (rows added so an item matrix divides the mesh); those are never ranked either.

Rank (1-based, pessimistic): for a user with scores s and target t, over the ranked items R (real items, minus
the user's history when `exclude_history` is on, but never minus t itself),

    rank = 1 + #{j in R : s_j > s_t} + #{j in R, j != t : s_j == s_t}

so every tie counts against the target and a constant scorer ranks every target last (rank = |R|), not first.
NaN scores count as -inf (a NaN target score therefore ranks last too). With a single relevant item,
HR@K = 1[rank <= K] and NDCG@K = 1[rank <= K] / log2(rank + 1) (the ideal DCG is 1).

Two ways in: a function `batch -> scores [B, N+1]` (any model, e.g. popularity), or `batch -> user vectors
[B, d]` plus an item matrix [N+1, d] (score = u . v_i; the matmul runs with items sharded over the mesh axes
that the logical axis `items` maps to and users over the batch axes). Targets are ranked by comparison
against their own score (one pass over the scores, no sort).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rporec_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Which cut-offs to report and whether each user's history items are removed from the ranking.

    `exclude_history` defaults to False, as in the reference (history items stay rankable).
    """

    ks: tuple[int, ...] = (5, 10, 20)
    exclude_history: bool = False

    def __post_init__(self):
        if not self.ks or any(int(k) < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty tuple of positive cut-offs, got {self.ks!r}")


def _ranked_columns(num_cols: int, num_items: int) -> jax.Array:
    col = jnp.arange(num_cols)
    return (col >= 1) & (col <= num_items)


def _exclusion_mask(exclude: jax.Array, num_cols: int) -> jax.Array:
    b = exclude.shape[0]
    # Scatter instead of comparing [B, H, M]: memory stays O(B*M). Id 0 (history padding) lands on the
    # padding column, which is unranked anyway.
    return jnp.zeros((b, num_cols), bool).at[jnp.arange(b)[:, None], exclude].set(True, mode="drop")


def ranks_from_scores(scores: jax.Array, targets: jax.Array, num_items: int,
                      exclude: jax.Array | None = None) -> jax.Array:
    """Returns int32 [B] pessimistic 1-based ranks of `targets` [B] among items 1..num_items of `scores` [B, M].

    `exclude` [B, H] (0 = none) removes those items from each user's ranking, except the user's own target.
    Columns 0 and > num_items are ignored. Jittable; works on sharded `scores`.
    """
    chex.assert_rank(scores, 2)
    chex.assert_shape(targets, (scores.shape[0],))
    b, m = scores.shape
    if m < num_items + 1:
        raise ValueError(f"scores have {m} columns; expected at least num_items + 1 = {num_items + 1}")
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    col = jnp.arange(m)
    is_target = col[None, :] == targets[:, None]
    # The target's own score read from the same matrix (not recomputed), so it ties with itself exactly.
    s_t = jnp.max(jnp.where(is_target, scores, -jnp.inf), axis=1)
    ranked = jnp.broadcast_to(_ranked_columns(m, num_items)[None, :], (b, m))
    if exclude is not None:
        chex.assert_shape(exclude, (b, None))
        ranked = ranked & ~(_exclusion_mask(exclude, m) & ~is_target)
    # Counting s_j >= s_t over ranked j includes the target itself once: exactly the pessimistic rank.
    return jnp.sum(ranked & (scores >= s_t[:, None]), axis=1, dtype=jnp.int32)


def rank_metrics(ranks, ks: Iterable[int] = (5, 10, 20)) -> dict[str, np.ndarray]:
    """Returns {'ndcg@K': float64 [B], 'hr@K': float64 [B]} per row from 1-based ranks [B]."""
    ranks = np.asarray(ranks, np.float64)
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
        out[f"hr@{k}"] = hit.astype(np.float64)
    return out


class MetricSums:
    """Running sums of per-row metrics over valid rows; `result()` returns the means."""

    def __init__(self, ks: Iterable[int] = (5, 10, 20)):
        self.ks = tuple(ks)
        self.sums = {name: 0.0 for k in self.ks for name in (f"ndcg@{k}", f"hr@{k}")}
        self.count = 0

    def add(self, ranks, valid=None) -> None:
        """Adds the rows of ranks [B] whose `valid` [B] is True (all rows if None)."""
        ranks = np.asarray(ranks)
        valid = np.ones(ranks.shape, bool) if valid is None else np.asarray(valid, bool)
        if valid.shape != ranks.shape:
            raise ValueError(f"valid has shape {valid.shape}; expected the ranks' shape {ranks.shape}")
        for name, per_row in rank_metrics(ranks[valid], self.ks).items():
            self.sums[name] += float(per_row.sum())
        self.count += int(valid.sum())

    def result(self) -> dict[str, float]:
        """Returns {'ndcg@K': mean, 'hr@K': mean, ..., 'count': rows}; means are 0.0 when no row was added."""
        out = {name: (s / self.count if self.count else 0.0) for name, s in self.sums.items()}
        out["count"] = self.count
        return out


def compute_metrics(ranks, valid=None, ks: Iterable[int] = (5, 10, 20)) -> dict[str, float]:
    """Returns {'ndcg@K', 'hr@K' means over valid rows, 'count'} for ranks [B] and mask valid [B]."""
    acc = MetricSums(ks)
    acc.add(ranks, valid)
    return acc.result()


# ---------------------------------------------------------------------------------------------------------------
# Sharded scoring against an item matrix


def items_mesh_axes(strategy: str | Mapping[str, Any]) -> tuple[str, ...]:
    """Returns the mesh axes that the logical axis `items` maps to under `strategy` (() = replicated)."""
    (axes,) = nn.logical_to_mesh_axes(("items",), shd.logical_rules(strategy))
    return _as_tuple(axes)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _scores_sharding(mesh: Mesh, strategy) -> NamedSharding:
    items = items_mesh_axes(strategy)
    # Users keep whatever batch axes the items do not use; a mesh axis may shard only one dimension.
    users = tuple(a for a in shd.BATCH_AXES if a not in items)
    return NamedSharding(mesh, P(users or None, items or None))


def _items_sharding(shape, mesh: Mesh, strategy) -> NamedSharding | None:
    try:
        return shd.logical_to_sharding(P("items", None), shape, mesh, shd.logical_rules(strategy), "item_matrix")
    except ValueError:  # rows do not divide the mesh: the matrix needs padding first
        return None


def shard_item_matrix(item_matrix, mesh: Mesh, strategy: str | Mapping[str, Any] = "dp") -> jax.Array:
    """Returns item_matrix [N+1, d] padded with zero rows to [M, d] (M a multiple of the items' mesh size) and
    placed with rows sharded as logical axis `items`; the padding rows are never ranked."""
    chex.assert_rank(item_matrix, 2)
    items = items_mesh_axes(strategy)
    n_shards = math.prod(mesh.shape[a] for a in items)
    rows = item_matrix.shape[0]
    padded_rows = -(-rows // n_shards) * n_shards
    if padded_rows != rows:
        item_matrix = jnp.pad(jnp.asarray(item_matrix), ((0, padded_rows - rows), (0, 0)))
    return jax.device_put(item_matrix, _items_sharding((padded_rows, item_matrix.shape[1]), mesh, strategy))


def user_item_scores(user_vecs: jax.Array, item_matrix: jax.Array) -> jax.Array:
    """Returns float32 [B, M] scores u . v_j of user_vecs [B, d] against every row of item_matrix [M, d]."""
    chex.assert_rank([user_vecs, item_matrix], 2)
    chex.assert_equal(user_vecs.shape[1], item_matrix.shape[1])
    return jnp.einsum("bd,md->bm", user_vecs, item_matrix, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_items", "scores_sharding"))
def _vector_ranks(user_vecs, item_matrix, targets, exclude, *, num_items, scores_sharding):
    scores = user_item_scores(user_vecs, item_matrix)
    if scores_sharding is not None:
        scores = jax.lax.with_sharding_constraint(scores, scores_sharding)
    return ranks_from_scores(scores, targets, num_items, exclude)


@functools.partial(jax.jit, static_argnames=("num_items",))
def _score_ranks(scores, targets, exclude, *, num_items):
    return ranks_from_scores(scores, targets, num_items, exclude)


def target_ranks(user_vecs, item_matrix, targets, exclude=None, num_items: int | None = None,
                 mesh: Mesh | None = None, strategy: str | Mapping[str, Any] = "dp") -> jax.Array:
    """Returns int32 [B] pessimistic ranks of targets [B] scored by user_vecs [B, d] @ item_matrix[1:N+1].T.

    `item_matrix` [M, d] holds padding row 0 and items 1..N (N = num_items, default M - 1); rows > N are
    ignored. With `mesh`, users shard over the batch axes and the scores over items per `strategy`;
    `item_matrix` should then come from `shard_item_matrix` (else it is placed here on every call).
    """
    num_items = item_matrix.shape[0] - 1 if num_items is None else num_items
    scores_sharding = None
    if mesh is not None:
        scores_sharding = _scores_sharding(mesh, strategy)
        row_multiple = math.prod(mesh.shape[a] for a in _as_tuple(scores_sharding.spec[0]))
        if user_vecs.shape[0] % row_multiple:
            raise ValueError(f"target_ranks: {user_vecs.shape[0]} users do not split over the mesh's user axes "
                             f"{_as_tuple(scores_sharding.spec[0])}; expected a multiple of {row_multiple} rows "
                             f"(`evaluate` pads batches itself)")
        if getattr(item_matrix, "sharding", None) != _items_sharding(item_matrix.shape, mesh, strategy):
            item_matrix = shard_item_matrix(item_matrix[: num_items + 1], mesh, strategy)
        user_vecs = jax.device_put(user_vecs, NamedSharding(mesh, P(scores_sharding.spec[0], None)))
    return _vector_ranks(jnp.asarray(user_vecs), item_matrix, jnp.asarray(targets),
                         None if exclude is None else jnp.asarray(exclude),
                         num_items=num_items, scores_sharding=scores_sharding)


@functools.partial(jax.jit, static_argnames=("k", "num_items"))
def _top_k(user_vecs, item_matrix, exclude, *, k, num_items):
    scores = user_item_scores(user_vecs, item_matrix)
    scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    b, m = scores.shape
    ranked = jnp.broadcast_to(_ranked_columns(m, num_items)[None, :], (b, m))
    if exclude is not None:
        ranked = ranked & ~_exclusion_mask(exclude, m)
    # lax.top_k puts the lower index first among equal values, so ties resolve to the smaller item id.
    _, ids = jax.lax.top_k(jnp.where(ranked, scores, -jnp.inf), k)
    # A row with fewer than k rankable items gets 0 (padding = no item) in its tail, never an excluded id.
    return jnp.where(jnp.take_along_axis(ranked, ids, axis=1), ids, 0).astype(jnp.int32)


def top_k_items(user_vecs, item_matrix, k: int, exclude=None, num_items: int | None = None) -> jax.Array:
    """Returns int32 [B, k] the k highest-scoring real item ids per user (best first; ties by smaller id).

    Scores are user_vecs [B, d] . item_matrix [M, d] rows 1..N (N = num_items, default M - 1); `exclude`
    [B, H] (0 = none) removes items per user; slots beyond a user's rankable items hold 0. Runs under the
    inputs' shardings.
    """
    num_items = item_matrix.shape[0] - 1 if num_items is None else num_items
    if not 1 <= k <= num_items:
        raise ValueError(f"top_k_items: k must be in 1..num_items={num_items}, got {k}")
    return _top_k(jnp.asarray(user_vecs), jnp.asarray(item_matrix),
                  None if exclude is None else jnp.asarray(exclude), k=int(k), num_items=int(num_items))


# ---------------------------------------------------------------------------------------------------------------
# Generic loop over batches


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - x.shape[0], axis=0)], axis=0)


def evaluate(fn: Callable[[dict], Any], batches: Iterable[dict], config: EvalConfig = EvalConfig(), *,
             item_matrix=None, num_items: int | None = None, mesh: Mesh | None = None,
             strategy: str | Mapping[str, Any] = "dp", keep_ranks: bool = False) -> dict[str, float]:
    """Returns {'ndcg@K': mean, 'hr@K': mean for K in config.ks, 'count': valid rows} over `batches`.

    Without `item_matrix`, fn(batch) -> scores [B, N+1] (column 0 ignored; N = num_items or columns - 1).
    With `item_matrix` [N+1, d], fn(batch) -> user vectors [B, d], ranked by the sharded matmul on `mesh`
    (default: all devices) under `strategy`. Batches are loader dicts with `target` [B], optional `valid` [B]
    (padded rows are ignored) and `history` [B, W] (needed when config.exclude_history).
    `keep_ranks` adds the per-instance results (for confidence intervals and paired tests): 'ranks' int32
    [count] and 'index' int64 [count], the valid rows' ranks and `index` fields (needed then) in batch order.
    """
    acc = MetricSums(config.ks)
    kept = {"ranks": [np.zeros(0, np.int32)], "index": [np.zeros(0, np.int64)]}
    if item_matrix is not None:
        mesh = shd.make_mesh() if mesh is None else mesh
        num_items = item_matrix.shape[0] - 1 if num_items is None else num_items
        items = shard_item_matrix(jnp.asarray(item_matrix)[: num_items + 1], mesh, strategy)
        sharding = _scores_sharding(mesh, strategy)
        row_multiple = math.prod(mesh.shape[a] for a in _as_tuple(sharding.spec[0]))
    for i, batch in enumerate(batches):
        targets = np.asarray(batch["target"])
        valid = np.asarray(batch.get("valid", np.ones(targets.shape, bool)), bool)
        if config.exclude_history and "history" not in batch:
            raise KeyError(f"batch {i}: exclude_history needs a 'history' [B, W] field; got {sorted(batch)}")
        exclude = np.asarray(batch["history"]) if config.exclude_history else None
        if keep_ranks and "index" not in batch:
            raise KeyError(f"batch {i}: keep_ranks needs an 'index' [B] field; got {sorted(batch)}")
        out = fn(batch)
        if item_matrix is None:
            n = out.shape[1] - 1 if num_items is None else num_items
        else:
            out = shd.to_host(out)  # user vectors come back to the host to be padded
            n = num_items
        bad = valid & ((targets < 1) | (targets > n))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"batch {i} row {row}: target {int(targets[row])} is not a real item id in 1..{n}")
        if item_matrix is None:
            chex.assert_shape(out, (targets.shape[0], None))
            ranks = _score_ranks(jnp.asarray(out), jnp.asarray(targets),
                                 None if exclude is None else jnp.asarray(exclude), num_items=n)
        else:
            b = targets.shape[0]
            rows = -(-b // row_multiple) * row_multiple
            # Pad to a multiple of the users' shard count; padded rows are dropped again below.
            user_vecs = _pad_rows(out, rows)
            ranks = target_ranks(user_vecs, items, _pad_rows(targets, rows),
                                 None if exclude is None else _pad_rows(exclude, rows),
                                 num_items=n, mesh=mesh, strategy=strategy)[:b]
        ranks = shd.to_host(ranks)
        acc.add(ranks, valid)
        if keep_ranks:
            kept["ranks"].append(np.asarray(ranks, np.int32)[valid])
            kept["index"].append(np.asarray(batch["index"], np.int64)[valid])
    result = acc.result()
    if keep_ranks:
        result.update({k: np.concatenate(v) for k, v in kept.items()})
    return result
