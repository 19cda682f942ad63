"""SASRec (Kang & McAuley, 2018) in Flax: causal self-attention over the item history, trained on the same splits.

Architecture (`arch='kang'`, the default): item embedding (scaled by sqrt(d)) + learned positional embedding,
dropout, `num_blocks` pre-LN blocks of causal multi-head self-attention and a point-wise ReLU feed-forward network
(residuals, dropout), a final layer norm. Histories are re-aligned to the right so the newest item always sits at
the last position (the original's left padding): positions mean "steps before now". The user vector is the last
position's hidden state; score(i) = user . E[i] with the shared item embedding E. `arch='recbole'` is RecBole
1.2's variant (post-LN BERT blocks, GELU, embedding layer norm, positions counted from the window's oldest item).

Training objective (chosen, stated): one prediction per sliding-window instance (history -> target, exactly the
Rechead's instances), softmax cross-entropy of the target among 1 + `num_negatives` items drawn uniformly from
the real items other than the target, resampled every step from an explicit key (the Rechead's loss, so the
comparison isolates the model); `num_negatives=0` is full-softmax cross-entropy over all items (RecBole's
`loss_type='CE'`). Adam (optax); the best epoch by valid `select_metric` is kept, and `patience` stops early.
For the train split the sliding-window instances are exactly the prefixes RecBole's sequential augmentation
trains on (each cut to the newest `window` items, one prediction at the last position): `recbole_config()`
with `max_len` = window is RecBole's SASRec on the same instances. Evaluation: full ranking through
`rporec_jax.eval`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, ClassVar, Mapping

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
from rporec_jax.data.ranges import Range, check_ranges
from rporec_jax.eval import EvalConfig, MetricSums, evaluate


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Model size, training schedule and evaluation of SASRec. `max_len` 0 = the dataset's history window.

    arch: 'kang' (the original SASRec: pre-LN, ReLU) or 'recbole' (RecBole 1.2: post-LN, GELU; see `SASRec`).
    inner_size: feed-forward width (0 = hidden). attn_dropout: dropout on the attention weights (None = dropout).
    num_negatives: sampled negatives per instance, 0 = full-softmax cross-entropy over all N real items.
    patience: stop after this many evaluations in a row without a new best valid `select_metric` (0 = run all
    `epochs`); the best evaluation's params are returned either way. `recbole_config()` gives RecBole 1.2's
    SASRec defaults.
    """

    arch: str = "kang"
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    attn_dropout: float | None = None
    inner_size: int = 0
    max_len: int = 0
    num_negatives: int = 49
    batch_size: int = 128
    epochs: int = 20
    learning_rate: float = 1e-3
    patience: int = 0
    eval_every: int = 1
    eval_batch_size: int = 256
    eval: EvalConfig = EvalConfig()
    select_metric: str = "ndcg@10"
    progress: bool = True

    RANGES: ClassVar[dict[str, Range]] = {
        "hidden": Range(1), "num_blocks": Range(0), "num_heads": Range(1), "dropout": Range(0, 1, hi_open=True),
        "attn_dropout": Range(0, 1, hi_open=True), "inner_size": Range(0, note="0 = hidden"),
        "max_len": Range(0, note="0 = the dataset's window"),
        "num_negatives": Range(0, note="0 = full softmax over all items"), "batch_size": Range(1),
        "epochs": Range(1), "learning_rate": Range(0, lo_open=True),
        "patience": Range(0, note="0 = no early stopping"), "eval_every": Range(0, note="0 = only the last epoch"),
        "eval_batch_size": Range(1),
    }

    def __post_init__(self):
        check_ranges(self)
        if self.arch not in ARCHS:
            raise ValueError(f"SASRecConfig.arch={self.arch!r}: expected one of {ARCHS}")
        if self.hidden % self.num_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by num_heads ({self.num_heads})")
        if self.patience and not self.eval_every:
            raise ValueError(f"patience={self.patience} needs evaluations: set eval_every >= 1")


def recbole_config(**overrides) -> SASRecConfig:
    """Returns RecBole 1.2's SASRec defaults (`sasrec.yaml` + `overall.yaml`): its architecture, hidden 64, inner
    size 256, 2 layers, 2 heads, hidden/attention dropout 0.5/0.5, CE over all items, Adam lr 1e-3, train batch
    2048, at most 300 epochs, early stop after 10 evaluations without a better valid score (RecBole's
    `stopping_step`; RecBole stops after 11 because it tests `> stopping_step`, and counts a tie as better),
    `max_len` = the dataset window; `overrides` replace fields."""
    base = dict(arch="recbole", hidden=64, num_blocks=2, num_heads=2, inner_size=256, dropout=0.5, attn_dropout=0.5,
                num_negatives=0, batch_size=2048, epochs=300, learning_rate=1e-3, patience=10, eval_every=1,
                eval_batch_size=1024)
    return SASRecConfig(**{**base, **overrides})


def right_align(history: jax.Array, history_len: jax.Array) -> jax.Array:
    """Returns int32 [B, W] the histories [B, W] (oldest first, right-padded with 0) moved to end at column W-1."""
    w = history.shape[1]
    src = jnp.arange(w)[None, :] - (w - history_len)[:, None]
    return jnp.where(src >= 0, jnp.take_along_axis(history, jnp.clip(src, 0, w - 1), axis=1), 0)


def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Returns a bool `shape` mask, True (kept) with probability 1 - t / 65536, t = round(rate * 65536).

    Why: two 16-bit draws per 32-bit random word instead of one draw per element: `jax.random.bernoulli` made
    dropout ~1/3 of a SASRec forward+backward on a shared 2-core CPU (2048 rows, rate 0.5: 7.5 s with dropout,
    4.9 s without). The key is re-wrapped as threefry, whose bits cost ~5x less at run time than 'rbg' here.
    """
    n = int(np.prod(shape))
    data = jnp.ravel(jax.random.key_data(key)).astype(jnp.uint32)
    key = jax.random.wrap_key_data(data[:2], impl="threefry2x32")
    for word in data[2:]:  # a wider key (rbg: 4 words) folds its other words in
        key = jax.random.fold_in(key, word)
    words = jax.random.bits(key, (-(-n // 2),), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:n].reshape(shape)
    return halves >= round(rate * 65536)


class _Dropout(nn.Module):
    """Inverted dropout with `dropout_mask` (exactly unbiased for the quantised rate); identity when off."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        t = round(self.rate * 65536)
        if deterministic or t == 0:
            return x
        keep = dropout_mask(self.make_rng("dropout"), x.shape, self.rate)
        return jnp.where(keep, x * (65536.0 / (65536 - t)), 0.0).astype(x.dtype)


class _Attention(nn.Module):
    """Multi-head scaled dot-product attention of queries `xq` [B, Q, d] over `xkv` [B, K, d] under `mask`
    [B, 1, Q, K], dropout on the attention weights; `kernel_init` for the q/k/v/out projections."""

    hidden: int
    num_heads: int
    attn_dropout: float
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, xq, xkv, mask, deterministic: bool):
        d = self.hidden // self.num_heads
        proj = lambda name: nn.DenseGeneral((self.num_heads, d), kernel_init=self.kernel_init, name=name)
        q, k, v = proj("query")(xq), proj("key")(xkv), proj("value")(xkv)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d).astype(np.float32)
        w = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(s.dtype).min), axis=-1)
        w = _Dropout(self.attn_dropout)(w, deterministic)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(self.hidden, axis=(-2, -1), kernel_init=self.kernel_init, name="out")(o)


class _Block(nn.Module):
    """One block. `arch` 'kang': pre-LN, ReLU, dropout after the activation and on each residual branch (the
    original SASRec); 'recbole': post-LN (eps 1e-12), GELU, dropout on each residual branch (RecBole 1.2,
    BERT-style). `last_only`: only the last position's output is computed (keys/values still read every
    position), which is all the next block or the user vector needs from the final block."""

    hidden: int
    num_heads: int
    dropout: float
    attn_dropout: float | None = None
    inner_size: int = 0
    arch: str = "kang"

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, last_only: bool = False):
        attn_drop = self.dropout if self.attn_dropout is None else self.attn_dropout
        inner = self.inner_size or self.hidden
        if self.arch == "recbole":
            init = nn.initializers.normal(0.02)
            ln = lambda: nn.LayerNorm(epsilon=1e-12)
            xq, mq = (x[:, -1:], mask[:, :, -1:]) if last_only else (x, mask)
            h = _Attention(self.hidden, self.num_heads, attn_drop, init)(xq, x, mq, deterministic)
            x = ln()(xq + _Dropout(self.dropout)(h, deterministic))
            h = nn.Dense(inner, kernel_init=init)(x)
            h = nn.Dense(self.hidden, kernel_init=init)(nn.gelu(h, approximate=False))
            return ln()(x + _Dropout(self.dropout)(h, deterministic))
        h = nn.LayerNorm(epsilon=1e-8)(x)
        hq, xq, mq = (h[:, -1:], x[:, -1:], mask[:, :, -1:]) if last_only else (h, x, mask)
        h = _Attention(self.hidden, self.num_heads, attn_drop)(hq, h, mq, deterministic)
        x = xq + _Dropout(self.dropout)(h, deterministic)
        h = nn.LayerNorm(epsilon=1e-8)(x)
        h = nn.Dense(inner)(h)
        h = _Dropout(self.dropout)(nn.relu(h), deterministic)
        h = nn.Dense(self.hidden)(h)
        return x + _Dropout(self.dropout)(h, deterministic)


ARCHS = ("kang", "recbole")


class SASRec(nn.Module):
    """SASRec encoder: `__call__(history [B, W], history_len [B]) -> user vectors [B, hidden]`.

    `arch` 'kang' (the original): item embedding * sqrt(d) + positional embedding counted back from the newest
    item, pre-LN blocks, a final layer norm. 'recbole' (RecBole 1.2): item embedding + positional embedding
    counted from the oldest item of the window, layer norm and dropout, post-LN blocks, no final norm; every
    kernel and embedding initialised N(0, 0.02).
    """

    num_items: int
    max_len: int
    hidden: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    attn_dropout: float | None = None
    inner_size: int = 0
    arch: str = "kang"

    def setup(self):
        self.item_emb = nn.Embed(self.num_items + 1, self.hidden, embedding_init=nn.initializers.normal(0.02))
        self.pos_emb = nn.Embed(self.max_len, self.hidden, embedding_init=nn.initializers.normal(0.02))
        self.blocks = [_Block(self.hidden, self.num_heads, self.dropout, self.attn_dropout, self.inner_size,
                              self.arch, name=f"block_{i}")
                       for i in range(self.num_blocks)]
        self.drop = _Dropout(self.dropout)
        if self.arch == "recbole":
            self.emb_ln = nn.LayerNorm(epsilon=1e-12)
        else:
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
        if self.arch == "recbole":
            # RecBole left-aligns: position 0 is the oldest item of the window.
            pos = jnp.clip(jnp.arange(w)[None, :] - (w - history_len)[:, None], 0, self.max_len - 1)
            x = self.emb_ln(self.item_emb(seq) + self.pos_emb(pos))
        else:
            x = self.item_emb(seq) * jnp.sqrt(float(self.hidden))
            x = x + self.pos_emb(jnp.arange(self.max_len - w, self.max_len))[None]
        x = self.drop(x, deterministic) * present[..., None]
        mask = nn.combine_masks(nn.make_causal_mask(seq), nn.make_attention_mask(present, present))
        for i, block in enumerate(self.blocks):
            # Padded positions are zeroed after every block so they carry nothing forward; the user vector is
            # the newest position's output, so the last block computes only that position.
            x = block(x, mask, deterministic, last_only=i == len(self.blocks) - 1) * present[:, -x.shape[1]:, None]
        x = x[:, -1]
        return x if self.arch == "recbole" else self.final_ln(x)

    def item_matrix(self):
        """Returns float32 [N+1, hidden] the item embeddings that score users (row 0 = padding)."""
        return self.item_emb.embedding


def _model(num_items: int, max_len: int, config: SASRecConfig) -> SASRec:
    return SASRec(num_items=num_items, max_len=max_len, hidden=config.hidden, num_blocks=config.num_blocks,
                  num_heads=config.num_heads, dropout=config.dropout, attn_dropout=config.attn_dropout,
                  inner_size=config.inner_size, arch=config.arch)


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


def full_softmax_loss(user: jax.Array, item_matrix: jax.Array, targets: jax.Array, valid: jax.Array) -> jax.Array:
    """Returns the scalar mean over valid rows of CE(target | all real items 1..N), user [B, d], item_matrix
    [N+1, d] (row 0 = padding: never a class, unlike RecBole, whose logits include the padding row)."""
    logits = user @ item_matrix.T
    logits = jnp.where(jnp.arange(item_matrix.shape[0])[None, :] == 0, -jnp.inf, logits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    valid = valid.astype(ce.dtype)
    return jnp.sum(jnp.where(valid > 0, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1.0)


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
        items, valid = p["params"]["item_emb"]["embedding"], jnp.ones(batch["target"].shape, bool)
        if num_negatives == 0:
            return full_softmax_loss(user, items, batch["target"], valid)
        negs = sample_negatives(k_neg, batch["target"], model.num_items, num_negatives)
        return sampled_softmax_loss(user, items, batch["target"], negs, valid)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _eval_batches(ds: PreparedDataset, split: str, batch_size: int) -> list[dict]:
    return list(whole_split_loader(ds, split, batch_size))


def evaluate_sasrec(params, ds: PreparedDataset, split: str, config: SASRecConfig, mesh: Mesh | None = None,
                    strategy: str | Mapping[str, Any] = "dp", batches: list[dict] | None = None,
                    keep_ranks: bool = False) -> dict[str, float]:
    """Returns the full-ranking metrics dict of SASRec `params` on `split` (user vector . item embeddings).

    `batches` (loader batches of `split`) may be passed to skip re-reading the split. `keep_ranks` adds the
    per-instance 'ranks' and 'index' (see `rporec_jax.eval.evaluate`).
    """
    model = _model(ds.num_items, config.max_len or ds.config.split.window, config)
    items = params["params"]["item_emb"]["embedding"]
    batches = _eval_batches(ds, split, config.eval_batch_size) if batches is None else batches
    fn = lambda b: _apply_eval(model, params, jnp.asarray(b["history"]), jnp.asarray(b["history_len"]))
    return evaluate(fn, batches, config.eval, item_matrix=items, mesh=mesh, strategy=strategy, keep_ranks=keep_ranks)


def train_sasrec(ds: PreparedDataset, config: SASRecConfig, key: jax.Array, mesh: Mesh | None = None,
                 should_stop=None, resume_dir: str | None = None) -> tuple[Any, dict]:
    """Returns (params of the best epoch by valid `select_metric`, metrics) after training SASRec on `ds`.

    metrics: {'best_epoch', 'valid' and 'test' (full-ranking dicts at the best epoch), 'epochs': per-epoch
    {'epoch', 'loss', 'valid'}, 'steps', 'seconds', 'stopped_early'}. Same config, dataset and key give the same
    result. With `patience`, training stops after that many evaluations in a row without a new best.
    The train split is read once through the loader and reshuffled every epoch by a key-derived permutation
    (the grain loader decodes JSON per record, which would dominate this small model's step time).
    Batches shard over the mesh's batch axes (default mesh: all devices); parameters are replicated.
    `should_stop()` is polled before every step: when it returns True, the training state (parameters, Adam
    state, best epoch so far, loop position) is saved under `resume_dir` (when given) and `Stopped` is raised; a
    later call with the same arguments continues from it and returns what an uninterrupted call returns.
    """
    from tqdm.auto import tqdm

    from rporec_jax.train.resume import Stopped

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
    best, stale = (-np.inf, 0, params, None), 0
    loop = {"epoch": 1, "losses": []}  # where training (re)starts: epoch, the losses of its steps already run
    fp = _resume_fingerprint(config, key, ds, mesh, n_train)
    if resume_dir is not None and (got := _load_resume(resume_dir, fp, params, opt_state)) is not None:
        params, opt_state, step, history, best, stale, loop = got
        bar.update(step)
    for epoch in range(loop["epoch"], config.epochs + 1):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, epoch), n_train))
        losses = [np.float32(x) for x in loop["losses"]] if epoch == loop["epoch"] else []
        for s in range(len(losses), steps_per_epoch):
            if should_stop is not None and should_stop():
                if resume_dir is not None:
                    _save_resume(resume_dir, fp, params, opt_state, step, history, best, stale,
                                 {"epoch": epoch, "losses": [float(x) for x in shd.to_host(losses)]})
                raise Stopped(f"eval (sasrec) at step {step} (epoch {epoch})")
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
                best, stale = (score, epoch, params, record["valid"]), 0
            else:
                stale += 1
        bar.set_postfix(postfix)
        history.append(record)
        if config.patience and stale >= config.patience:
            break  # early stop: `patience` evaluations in a row without a new best
    bar.close()
    _, best_epoch, best_params, best_valid = best
    metrics = {"best_epoch": best_epoch, "valid": best_valid,
               "test": evaluate_sasrec(best_params, ds, "test", config, mesh),
               "epochs": history, "steps": step, "seconds": time.time() - t0,
               "stopped_early": len(history) < config.epochs}
    return best_params, metrics


def _resume_fingerprint(config: SASRecConfig, key: jax.Array, ds, mesh: Mesh, n_train: int) -> str:
    from rporec_jax.train.resume import fingerprint

    raw = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return fingerprint(dataclasses.replace(config, progress=True), np.asarray(raw).tolist(),
                       getattr(ds, "manifest", {}).get("fingerprint"), dict(mesh.shape), n_train)


def _save_resume(root: str, fp: str, params, opt_state, step: int, history: list, best: tuple, stale: int,
                 loop: dict) -> None:
    """Saves SASRec's resume state: parameters, Adam state, the best epoch's parameters, and (JSON) the step,
    loop position, per-epoch history, best score/epoch/valid metrics and the patience count."""
    from rporec_jax.train import resume

    score, epoch, best_params, valid = best
    meta = {"fingerprint": fp, "step": step, "history": history, "stale": stale, "loop": loop,
            "best": [None if score == -np.inf else float(score), epoch, valid]}
    resume.save(root, step, {"params": params, "opt_state": opt_state, "best_params": best_params}, meta)


def _load_resume(root: str, fp: str, params, opt_state):
    """Returns (params, opt_state, step, history, best, stale, loop) saved by `_save_resume` under `root`, or None
    when there is no usable state (training starts from its beginning)."""
    from rporec_jax.train import resume

    like = resume.abstract({"params": params, "opt_state": opt_state, "best_params": params})
    got = resume.load(root, lambda meta: like, fp, "sasrec")
    if got is None:
        return None
    arrays, meta = got
    score, epoch, valid = meta["best"]
    best = (-np.inf if score is None else score, epoch, arrays["best_params"], valid)
    return arrays["params"], arrays["opt_state"], meta["step"], meta["history"], best, meta["stale"], meta["loop"]
