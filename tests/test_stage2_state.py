"""Stage-1 -> stage-2 transition: policy trains; Rechead, item matrix and reference stay frozen."""

import jax
import jax.numpy as jnp
import numpy as np

from rporec_jax.train.stage2 import stage2_state
from rporec_jax.train.state import OptimConfig, TrainState, add_params, compose, set_trainable, attach_optimizer


def _stage1():
    s = TrainState.create({}, jax.random.key(0))
    return compose(add_params("rechead", {"w": jnp.ones(3)}), add_params("items", jnp.arange(4.0)),
                   set_trainable("rechead"), attach_optimizer(OptimConfig(lr=0.1).make()))(s)


def test_transition_freezes_rechead_and_snapshots_reference():
    policy = {"layer": jnp.full((2,), 0.5)}
    s2 = stage2_state(_stage1(), policy, OptimConfig(lr=0.1, weight_decay=0.0), reference_dtype=jnp.bfloat16)
    assert s2.trainable == ("policy",)
    assert s2.params["reference"]["layer"].dtype == jnp.bfloat16
    grads = {"policy": {"layer": jnp.ones(2)}}
    s3, _ = s2.apply_gradients(grads)
    assert not np.allclose(s3.params["policy"]["layer"], 0.5)  # the policy moved
    np.testing.assert_array_equal(s3.params["reference"]["layer"], np.full(2, 0.5))
    np.testing.assert_array_equal(s3.params["rechead"]["w"], np.ones(3))
    np.testing.assert_array_equal(s3.params["items"], np.arange(4.0))
    assert jax.tree_util.tree_structure(s3.opt_state) == jax.tree_util.tree_structure(s2.opt_state)
