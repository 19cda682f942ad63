"""TrainState and the small pure transforms that move it between stages.

Parameters live in named subtrees (`params['rechead']`, `params['items']`, `params['policy']`, ...);
`trainable` names the subtrees the optimizer updates, everything else is frozen and gets no gradient.
Stage 1 and stage 2 differ only in the transforms applied and the step function run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

Transform = Callable[["TrainState"], "TrainState"]


@struct.dataclass
class TrainState:
    """step [], params {name: pytree}, opt_state (of the trainable subtrees), key (explicit randomness)."""

    step: jax.Array
    params: dict
    opt_state: Any
    key: jax.Array
    trainable: tuple = struct.field(pytree_node=False, default=())
    tx: Optional[optax.GradientTransformation] = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params: dict, key: jax.Array, mesh=None) -> "TrainState":
        """Returns a state with nothing trainable and no optimizer (step and key replicated on `mesh`)."""
        step = jnp.zeros((), jnp.int32)
        if mesh is not None:
            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            # typed keys cannot be put on other processes' devices; their raw data can (multi-host)
            key = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(key), rep),
                                           impl=jax.random.key_impl(key))
            step = jax.device_put(step, rep)
        return cls(step, dict(params), None, key)

    def split_params(self) -> tuple[dict, dict]:
        """Returns (trainable subtrees, frozen subtrees)."""
        train = {k: v for k, v in self.params.items() if k in self.trainable}
        frozen = {k: v for k, v in self.params.items() if k not in self.trainable}
        return train, frozen

    def apply_gradients(self, grads: dict) -> tuple["TrainState", jax.Array]:
        """Returns (state after one optimizer update with grads of the trainable subtrees, grad norm)."""
        if self.tx is None:
            raise ValueError("TrainState has no optimizer: apply attach_optimizer(...) first")
        train, _ = self.split_params()
        updates, opt_state = self.tx.update(grads, self.opt_state, train)
        new = optax.apply_updates(train, updates)
        return self.replace(step=self.step + 1, params={**self.params, **new}, opt_state=opt_state), \
            optax.global_norm(grads)

    def next_key(self) -> tuple["TrainState", jax.Array]:
        """Returns (state with an advanced key, a fresh subkey)."""
        key, sub = jax.random.split(self.key)
        return self.replace(key=key), sub


def compose(*transforms: Transform) -> Transform:
    """Returns the transform applying `transforms` left to right."""
    def run(state: TrainState) -> TrainState:
        for t in transforms:
            state = t(state)
        return state
    return run


def set_trainable(*names: str) -> Transform:
    """Returns a transform making exactly `names` trainable (the optimizer state is dropped: re-attach)."""
    def run(state: TrainState) -> TrainState:
        missing = [n for n in names if n not in state.params]
        if missing:
            raise KeyError(f"set_trainable: no parameter subtree {missing[0]!r}; have {sorted(state.params)}")
        return state.replace(trainable=tuple(names), opt_state=None, tx=None)
    return run


def attach_optimizer(tx: optax.GradientTransformation) -> Transform:
    """Returns a transform that initialises `tx` over the trainable subtrees."""
    def run(state: TrainState) -> TrainState:
        if not state.trainable:
            raise ValueError("attach_optimizer: nothing is trainable; apply set_trainable(...) first")
        train, _ = state.split_params()
        meshes = {x.sharding.mesh for x in jax.tree_util.tree_leaves(train)
                  if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)}
        if len(meshes) == 1:
            shardings = jax.tree_util.tree_map(lambda x: x.sharding, train)
            opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, train, shardings, meshes.pop()))(train)
        else:
            opt_state = tx.init(train)
        return state.replace(tx=tx, opt_state=opt_state)
    return run


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh) -> Any:
    """Returns the shardings of `tx`'s state: moments like their parameters, scalars (Adam's count) replicated.

    Explicit because the moments do not depend on the parameters' values: left to XLA, a jitted `tx.init`
    may replicate them (it did for the embedding and lm_head moments under fsdp, measured by the TPU plan)."""
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, shapes, param_shardings, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def add_params(name: str, tree: Any) -> Transform:
    """Returns a transform adding a (frozen) parameter subtree, e.g. the item matrix."""
    return lambda state: state.replace(params={**state.params, name: tree})


def snapshot(src: str, dst: str, dtype: Optional[Any] = None) -> Transform:
    """Returns a transform copying subtree `src` to a frozen `dst` (e.g. the GRPO reference model)."""
    def run(state: TrainState) -> TrainState:
        tree = state.params[src]
        if dtype is not None:
            tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)
        else:
            tree = jax.tree_util.tree_map(jnp.copy, tree)
        return state.replace(params={**state.params, dst: tree})
    return run


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, global-norm gradient clipping."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_fraction: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999

    def make(self) -> optax.GradientTransformation:
        """Returns the optax transformation."""
        decay_steps = max(self.total_steps, self.warmup_steps + 1)
        schedule = optax.warmup_cosine_decay_schedule(0.0 if self.warmup_steps else self.lr, self.lr,
                                                      self.warmup_steps, decay_steps,
                                                      self.lr * self.end_lr_fraction)
        parts = [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []
        return optax.chain(*parts, optax.adamw(schedule, self.b1, self.b2, weight_decay=self.weight_decay))
