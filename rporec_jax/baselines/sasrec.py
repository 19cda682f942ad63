"""SASRec (Kang & McAuley, 2018) in Flax: causal self-attention over the item history, trained on the same splits.

Architecture (standard): item embedding (scaled by sqrt(d)) + learned positional embedding, dropout, `num_blocks`
pre-LN blocks of causal multi-head self-attention and a point-wise ReLU feed-forward network (residuals,
dropout), a final layer norm. Histories are re-aligned to the right so the newest item always sits at the last
position (the original's left padding): positions mean "steps before now". The user vector is the last
position's hidden state; score(i) = user . E[i] with the shared item embedding E.

Training objective (chosen, stated): one prediction per sliding-window instance (history -> target, exactly the
Rechead's instances), softmax cross-entropy of the target among 1 + `num_negatives` items drawn uniformly from
the real items other than the target, resampled every step from an explicit key (the Rechead's loss, so the
comparison isolates the model). Adam (optax). Evaluation: full ranking through `rporec_jax.eval`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rporec_jax import sharding as shd
from rporec_jax.data import PreparedDataset
from rporec_jax.data.pipeline import whole_split_loader
from rporec_jax.eval import EvalConfig, MetricSums, evaluate


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Model size, training schedule and evaluation of SASRec. `max_len` 0 = the dataset's history window."""

    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_len: int = 0
    num_negatives: int = 49
    batch_size: int = 128
    epochs: int = 20
    learning_rate: float = 1e-3
    eval_every: int = 1
    eval_batch_size: int = 256
    eval: EvalConfig = EvalConfig()
    select_metric: str = "ndcg@10"
    progress: bool = True

    def __post_init__(self):
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")
        if self.num_negatives < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"num_negatives, epochs and batch_size must be >= 1, got {self.num_negatives}, "
                             f"{self.epochs}, {self.batch_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def right_align(history: jax.Array, history_len: jax.Array) -> jax.Array:
    """Returns int32 [B, W] the histories [B, W] (oldest first, right-padded with 0) moved to end at column W-1."""
    w = history.shape[1]
    src = jnp.arange(w)[None, :] - (w - history_len)[:, None]
    return jnp.where(src >= 0, jnp.take_along_axis(history, jnp.clip(src, 0, w - 1), axis=1), 0)


class _Block(nn.Module):
    hidden: int
    num_heads: int
    dropout: float

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        h = nn.LayerNorm(epsilon=1e-8)(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.hidden,
                                            dropout_rate=self.dropout, deterministic=deterministic)(h, h, mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=deterministic)(h)
        h = nn.LayerNorm(epsilon=1e-8)(x)
        h = nn.Dense(self.hidden)(h)
        h = nn.Dropout(self.dropout, deterministic=deterministic)(nn.relu(h))
        h = nn.Dense(self.hidden)(h)
        return x + nn.Dropout(self.dropout, deterministic=deterministic)(h)


class SASRec(nn.Module):
    """SASRec encoder: `__call__(history [B, W], history_len [B]) -> user vectors [B, hidden]`."""

    num_items: int
    max_len: int
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2

    def setup(self):
        self.item_emb = nn.Embed(self.num_items + 1, self.hidden, embedding_init=nn.initializers.normal(0.02))
        self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=nn.initializers.normal(0.02))
        self.blocks = [_Block(self.hidden, self.num_heads, self.dropout, name=f"block_{i}")
                       for i in range(self.num_blocks)]
        self.drop = nn.Dropout(self.dropout)
        self.final_ln = nn.LayerNorm(epsilon=1e-8)

    def __call__(self, history, history_len, deterministic: bool = True):
        chex.assert_rank(history, 2)
        chex.assert_shape(history_len, (history.shape[0],))
        if history.shape[1] > self.max_len:
            # Keep the newest max_len items: drop the oldest of longer histories.
            keep = jnp.minimum(history_len, self.max_len)
            start = history_len - keep
            idx = jnp.clip(start[:, None] + jnp.arange(self.max_len)[None, :], 0, history.shape[1] - 1)
            history = jnp.where(jnp.arange(self.max_len)[None, :] < keep[:, None],
                                jnp.take_along_axis(history, idx, axis=1), 0)
            history_len = keep
        seq = right_align(history, history_len)
        w = seq.shape[1]
        present = seq > 0
        x = self.item_emb(seq) * jnp.sqrt(float(self.hidden))
        x = x + self.pos_emb(jnp.arange(self.max_len - w, self.max_len))[None]
        x = self.drop(x, deterministic=deterministic) * present[..., None]
        mask = nn.combine_masks(nn.make_causal_mask(seq), nn.make_attention_mask(present, present))
        for block in self.blocks:
            # Padded positions are zeroed after every block so they carry nothing forward.
            x = block(x, mask, deterministic) * present[..., None]
        return self.final_ln(x)[:, -1]

    def item_matrix(self):
        """Returns float32 [N+1, hidden] the item embeddings that score users (row 0 = padding)."""
        return self.item_emb.embedding


def _model(num_items: int, max_len: int, config: SASRecConfig) -> SASRec:
    return SASRec(num_items=num_items, max_len=max_len, hidden=config.hidden, num_blocks=config.num_blocks,
                  num_heads=config.num_heads, dropout=config.dropout)


def sample_negatives(key: jax.Array, targets: jax.Array, num_items: int, k: int) -> jax.Array:
    """Returns int32 [B, k] ids uniform over 1..num_items minus each row's target [B] (with replacement)."""
    draw = jax.random.randint(key, (targets.shape[0], k), 1, num_items)
    # Draw from N-1 ids and step over the target: uniform over the allowed ids without rejection.
    return jnp.where(draw >= targets[:, None], draw + 1, draw).astype(jnp.int32)


def sampled_softmax_loss(user: jax.Array, item_matrix: jax.Array, targets: jax.Array,
                         negatives: jax.Array, valid: jax.Array) -> jax.Array:
    """Returns the scalar mean over valid rows of CE(target | target + negatives), user [B, d], negatives [B, K]."""
    cand = jnp.concatenate([targets[:, None], negatives], axis=1)
    logits = jnp.einsum("bd,bkd->bk", user, item_matrix[cand])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(targets.shape, jnp.int32))
    valid = valid.astype(ce.dtype)
    return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def sasrec_user_vectors(params, ds: PreparedDataset, config: SASRecConfig, batch: Mapping[str, Any]) -> jax.Array:
    """Returns float32 [B, hidden] SASRec user vectors (dropout off) for a loader batch."""
    model = _model(ds.num_items, config.max_len or ds.config.split.window, config)
    return _apply_eval(model, params, jnp.asarray(batch["history"]), jnp.asarray(batch["history_len"]))


# The module (a hashable dataclass) is static: one compile per model shape, reused across evaluations.
_apply_eval = jax.jit(lambda model, params, history, history_len: model.apply(params, history, history_len),
                      static_argnums=0)


def rbg_key(key: jax.Array) -> jax.Array:
    """Returns an 'rbg' PRNG key derived deterministically from `key` (of any PRNG implementation).

    Why: XLA compiles threefry sampling (parameter init, dropout masks) several times slower on CPU than the
    RngBitGenerator behind 'rbg'; draws stay reproducible for a given key, backend and device layout.
    """
    data = jnp.ravel(jax.random.key_data(key)).astype(jnp.uint32)
    return jax.random.wrap_key_data(jnp.resize(data, (4,)), impl="rbg")


_init = jax.jit(lambda model, key, history, history_len: model.init(key, history, history_len), static_argnums=0)


@functools.partial(jax.jit, static_argnames=("model", "num_negatives", "learning_rate"))
def _train_step(params, opt_state, batch, key, *, model: SASRec, num_negatives: int, learning_rate: float):
    # Module-level with static hyper-parameters: repeated runs with one config reuse a single compile.
    tx = optax.adam(learning_rate)

    def loss_fn(p):
        k_drop, k_neg = jax.random.split(key)
        user = model.apply(p, batch["history"], batch["history_len"], deterministic=False, rngs={"dropout": k_drop})
        negs = sample_negatives(k_neg, batch["target"], model.num_items, num_negatives)
        return sampled_softmax_loss(user, p["params"]["item_emb"]["embedding"], batch["target"], negs,
                                    jnp.ones(batch["target"].shape, bool))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _eval_batches(ds: PreparedDataset, split: str, batch_size: int) -> list[dict]:
    return list(whole_split_loader(ds, split, batch_size))


def evaluate_sasrec(params, ds: PreparedDataset, split: str, config: SASRecConfig, mesh: Mesh | None = None,
                    strategy: str | Mapping[str, Any] = "dp", batches: list[dict] | None = None) -> dict[str, float]:
    """Returns the full-ranking metrics dict of SASRec `params` on `split` (user vector . item embeddings).

    `batches` (loader batches of `split`) may be passed to skip re-reading the split.
    """
    model = _model(ds.num_items, config.max_len or ds.config.split.window, config)
    items = params["params"]["item_emb"]["embedding"]
    batches = _eval_batches(ds, split, config.eval_batch_size) if batches is None else batches
    fn = lambda b: _apply_eval(model, params, jnp.asarray(b["history"]), jnp.asarray(b["history_len"]))
    return evaluate(fn, batches, config.eval, item_matrix=items, mesh=mesh, strategy=strategy)


def train_sasrec(ds: PreparedDataset, config: SASRecConfig, key: jax.Array, mesh: Mesh | None = None,
                 ) -> tuple[Any, dict]:
    """Returns (params of the best epoch by valid `select_metric`, metrics) after training SASRec on `ds`.

    metrics: {'best_epoch', 'valid' and 'test' (full-ranking dicts at the best epoch), 'epochs': per-epoch
    {'epoch', 'loss', 'valid'}, 'steps', 'seconds'}. Same config, dataset and key give the same result.
    The train split is read once through the loader and reshuffled every epoch by a key-derived permutation
    (the grain loader decodes JSON per record, which would dominate this small model's step time).
    Batches shard over the mesh's batch axes (default mesh: all devices); parameters are replicated.
    """
    from tqdm.auto import tqdm

    mesh = shd.make_mesh() if mesh is None else mesh
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % n_batch_shards:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the mesh's batch shards "
                         f"(data x fsdp = {n_batch_shards})")
    if config.select_metric not in MetricSums(config.eval.ks).result():
        raise ValueError(f"select_metric {config.select_metric!r} is not reported for ks={config.eval.ks}")
    num_items, window = ds.num_items, ds.config.split.window
    model = _model(num_items, config.max_len or window, config)
    train = {k: np.concatenate([b[k][b["valid"]] for b in _eval_batches(ds, "train", 1024)])
             for k in ("history", "history_len", "target")}
    n_train = len(train["target"])
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{ds.path}: train split has {n_train} instances, fewer than batch_size {config.batch_size}")
    valid_batches = _eval_batches(ds, "valid", config.eval_batch_size)

    k_init, k_data, k_train = jax.random.split(rbg_key(key), 3)
    params = _init(model, k_init, jnp.zeros((1, window), jnp.int32), jnp.ones((1,), jnp.int32))
    replicated = shd.replicated(mesh)
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optax.adam(config.learning_rate).init(params), replicated)

    bar = tqdm(total=config.epochs * steps_per_epoch, desc="sasrec", disable=not config.progress)
    t0, step, history = time.time(), 0, []
    best = (-np.inf, 0, params, None)
    for epoch in range(1, config.epochs + 1):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, epoch), n_train))
        losses = []
        for s in range(steps_per_epoch):
            rows = perm[s * config.batch_size : (s + 1) * config.batch_size]
            batch = shd.host_batch_to_global({k: v[rows] for k, v in train.items()}, mesh)
            params, opt_state, loss = _train_step(params, opt_state, batch, jax.random.fold_in(k_train, step),
                                                  model=model, num_negatives=config.num_negatives,
                                                  learning_rate=config.learning_rate)
            losses.append(loss)
            step += 1
            bar.update(1)
        record = {"epoch": epoch, "loss": float(np.mean(shd.to_host(losses)))}
        postfix = {"loss": f"{record['loss']:.4f}"}
        if (config.eval_every and epoch % config.eval_every == 0) or epoch == config.epochs:
            record["valid"] = evaluate_sasrec(params, ds, "valid", config, mesh, batches=valid_batches)
            score = record["valid"][config.select_metric]
            postfix[config.select_metric] = f"{score:.4f}"
            if score > best[0]:
                best = (score, epoch, params, record["valid"])
        bar.set_postfix(postfix)
        history.append(record)
    bar.close()
    _, best_epoch, best_params, best_valid = best
    metrics = {"best_epoch": best_epoch, "valid": best_valid,
               "test": evaluate_sasrec(best_params, ds, "test", config, mesh),
               "epochs": history, "steps": step, "seconds": time.time() - t0}
    return best_params, metrics
