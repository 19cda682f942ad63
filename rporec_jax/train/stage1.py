"""Stage 1: train the Rechead (sampled-softmax CE over target + K negatives); the LLM is untouched.

    state = stage1_state(head_cfg, head_params, item_matrix, OptimConfig(lr=1e-3), key)
    step = make_stage1_step(head_cfg, state, mesh)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterator, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from rporec_jax import sharding as shd
from rporec_jax.losses import sampled_softmax_ce
from rporec_jax.models.rechead import Rechead, RecheadConfig, item_vectors
from rporec_jax.train.state import OptimConfig, TrainState, add_params, attach_optimizer, compose, set_trainable

log = logging.getLogger(__name__)


def stage1_state(head: RecheadConfig, head_params: dict, item_matrix, optim: OptimConfig, key: jax.Array,
                 mesh: Optional[Mesh] = None, strategy="dp") -> TrainState:
    """Returns a TrainState holding the Rechead (trainable) and the item matrix `[items + 1, dim]` (frozen,
    zero-padded to a shardable row count), placed on `mesh`: the item matrix shards over items under fsdp
    strategies; the Rechead follows `strategy`'s rules."""
    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    shardings = shd.tree_shardings(head_params, mesh, strategy)
    head_params = jax.device_put(nn.unbox(head_params), shardings)
    rules = shd.logical_rules(strategy)
    items = np.asarray(item_matrix, np.float32)
    # Zero rows pad the matrix to a multiple of the mesh axes holding 'items' (ids past the catalogue are
    # never targets, negatives or ranked: evaluation slices the real [items + 1] rows).
    multiple = int(np.prod([mesh.shape[a] for a in np.atleast_1d(dict(rules).get("items") or [])], dtype=int))
    items = np.pad(items, [(0, -len(items) % multiple), (0, 0)])
    items = jax.device_put(items, shd.logical_to_sharding(jax.sharding.PartitionSpec("items", None), items.shape,
                                                          mesh, rules, "item_matrix"))
    return compose(add_params("rechead", head_params), add_params("items", items), set_trainable("rechead"),
                   attach_optimizer(optim.make()))(TrainState.create({}, key, mesh))


def user_vectors(head: RecheadConfig, params: dict, batch: dict, deterministic: bool = True, key=None):
    """Returns user vectors `[batch, dim]` of the Rechead in `params['rechead']`."""
    rngs = None if deterministic else {"dropout": key}
    return Rechead(head).apply({"params": params["rechead"]["user"]}, batch, deterministic, rngs=rngs)


def stage1_loss(head: RecheadConfig, train: dict, frozen: dict, batch: dict, key: jax.Array):
    """Returns (loss, metrics) of one batch with dropout on."""
    params = {**frozen, **train}
    u = user_vectors(head, params, batch, deterministic=False, key=key)
    items = item_vectors(head, params["rechead"], params["items"])
    return sampled_softmax_ce(u, items, batch["target"], batch["negatives"], batch.get("valid"))


def make_stage1_step(head: RecheadConfig, state: TrainState, mesh: Optional[Mesh] = None) -> Callable:
    """Returns the jitted pure step `(state, batch) -> (state, metrics)` with explicit shardings: the state
    keeps its placement (donated), the batch is split over ('data', 'fsdp')."""
    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])

    def step(state: TrainState, batch: dict):
        state, key = state.next_key()
        train, frozen = state.split_params()
        grads, metrics = jax.grad(lambda t: stage1_loss(head, t, frozen, batch, key), has_aux=True)(train)
        state, gnorm = state.apply_gradients(grads)
        return state, {**metrics, "grad_norm": gnorm}

    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    batch_sharding = lambda b: {k: shd.batch_sharding(mesh, np.ndim(v)) for k, v in b.items()}  # noqa: E731
    compiled = {}

    def run(state: TrainState, batch: dict):
        sig = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if sig not in compiled:  # one program per batch signature (the last partial batch is padded)
            compiled[sig] = jax.jit(step, in_shardings=(state_shardings, batch_sharding(batch)),
                                    out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)
        return compiled[sig](state, batch)

    return run


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Stage-1 training loop settings (reference: AdamW lr 1e-3, batch 128, K = 49 negatives)."""

    batch_size: int = 128
    epochs: int = 10
    optim: OptimConfig = OptimConfig()
    seed: int = 0
    log_every: int = 50


def iterate_batches(examples: dict, batch_size: int, rng: np.random.Generator, shuffle: bool = True,
                    multiple: int = 1) -> Iterator[dict]:
    """Yields batches of `examples` ({name: array [n, ...]}); the last one is padded up to a multiple of
    `multiple` rows with `valid=False` rows so shapes stay few and shardable."""
    n = len(next(iter(examples.values())))
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        size = -(-len(idx) // multiple) * multiple if len(idx) < batch_size else batch_size
        padded = np.concatenate([idx, np.repeat(idx[:1], size - len(idx))])
        batch = {k: v[padded] for k, v in examples.items()}
        batch["valid"] = np.arange(size) < len(idx)
        yield batch


def fit_stage1(state: TrainState, head: RecheadConfig, examples: dict, cfg: Stage1Config,
               mesh: Optional[Mesh] = None, on_epoch: Optional[Callable] = None):
    """Returns (trained state, per-epoch history) after `cfg.epochs` passes over `examples` with a progress
    bar; `on_epoch(epoch, state) -> dict` adds evaluation metrics to the history."""
    from tqdm.auto import tqdm

    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    multiple = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    step = make_stage1_step(head, state, mesh)
    rng = np.random.default_rng(cfg.seed)
    n = len(next(iter(examples.values())))
    steps_per_epoch = -(-n // cfg.batch_size)
    history = []
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="stage 1", unit="step") as bar:
        for epoch in range(cfg.epochs):
            t0, losses = time.perf_counter(), []
            for batch in iterate_batches(examples, cfg.batch_size, rng, multiple=multiple):
                state, metrics = step(state, batch)
                losses.append(metrics["loss"])
                bar.update(1)
                if len(losses) % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
            row = {"epoch": epoch + 1, "loss": float(np.mean(jax.device_get(losses))),
                   "examples_per_s": n / (time.perf_counter() - t0)}
            if on_epoch is not None:
                row.update(on_epoch(epoch + 1, state))
            history.append(row)
            log.info("stage 1 epoch %d: %s", epoch + 1, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
    return state, history
