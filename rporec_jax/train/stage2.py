"""Stage 2 set-up: the stage-1 -> stage-2 transition as a composition of train-state transforms."""

from __future__ import annotations

from typing import Any, Optional

from rporec_jax.train.state import OptimConfig, TrainState, add_params, attach_optimizer, compose, set_trainable, \
    snapshot


def stage2_transition(policy_params: Any, optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.0),
                      reference_dtype: Optional[Any] = None):
    """Returns the transform stage-1 state -> stage-2 state: add the backbone as `policy` (the only trainable
    subtree; the Rechead and item matrix become frozen), snapshot it as the frozen `reference` (KL anchor and
    summariser; optionally held in `reference_dtype`, e.g. bfloat16) and attach the stage-2 optimizer."""
    return compose(add_params("policy", policy_params), set_trainable("policy"),
                   snapshot("policy", "reference", reference_dtype), attach_optimizer(optim.make()))


def stage2_state(stage1: TrainState, policy_params: Any, optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.0),
                 reference_dtype: Optional[Any] = None) -> TrainState:
    """Returns the stage-2 TrainState built from a trained stage-1 state and the backbone's params."""
    return stage2_transition(policy_params, optim, reference_dtype)(stage1)
