"""Stage-1 loss vs NumPy, train-state transforms, and the jitted step (learning, sharding, frozen parts)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rporec_jax import sharding as shd
from rporec_jax.losses import sampled_softmax_ce
from rporec_jax.models.rechead import RecheadConfig, init_rechead
from rporec_jax.train.stage1 import Stage1Config, fit_stage1, iterate_batches, stage1_state, user_vectors
from rporec_jax.train.state import OptimConfig, TrainState, add_params, attach_optimizer, compose, set_trainable, \
    snapshot


def test_sampled_softmax_ce_matches_numpy():
    rng = np.random.default_rng(0)
    user, items = rng.normal(size=(4, 6)), rng.normal(size=(10, 6))
    target, neg = np.array([1, 2, 3, 9]), rng.integers(1, 10, (4, 5))
    valid = np.array([1, 1, 0, 1], bool)
    loss, m = sampled_softmax_ce(jnp.asarray(user), jnp.asarray(items), target, neg, valid)
    logits = np.einsum("bd,bkd->bk", user, items[np.concatenate([target[:, None], neg], 1)])
    ce = np.log(np.exp(logits).sum(1)) - logits[:, 0]
    np.testing.assert_allclose(float(loss), ce[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["candidate_acc"]), (logits[:, 0] > logits[:, 1:].max(1))[valid].mean())


def test_transforms_are_small_and_checked():
    s = TrainState.create({"a": jnp.ones(3)}, jax.random.key(0))
    with pytest.raises(KeyError, match="no parameter subtree 'b'"):
        set_trainable("b")(s)
    with pytest.raises(ValueError, match="nothing is trainable"):
        attach_optimizer(optax.sgd(1.0))(s)
    s = compose(add_params("b", jnp.zeros(2)), set_trainable("b"), attach_optimizer(optax.sgd(1.0)),
                snapshot("b", "b_ref"))(s)
    assert s.trainable == ("b",) and set(s.params) == {"a", "b", "b_ref"}
    s, _ = s.apply_gradients({"b": jnp.ones(2)})
    np.testing.assert_array_equal(s.params["b"], [-1, -1])  # trained
    np.testing.assert_array_equal(s.params["b_ref"], [0, 0])  # the snapshot is a frozen copy
    np.testing.assert_array_equal(s.params["a"], [1, 1, 1])


def _toy_problem(n=512, vocab=40, items=20, k=15, seed=0):
    """Prompts whose first token determines the target item: a head that learns reaches ~100% accuracy."""
    rng = np.random.default_rng(seed)
    target = rng.integers(1, items + 1, n)
    ids = rng.integers(0, vocab, (n, 6))
    ids[:, 0] = target  # token id == item id
    neg = (target[:, None] + rng.integers(1, items, (n, k)) - 1) % items + 1
    return {"prompt_ids": ids.astype(np.int32), "prompt_mask": np.ones((n, 6), bool),
            "target": target.astype(np.int32), "negatives": neg.astype(np.int32)}


@pytest.mark.parametrize("strategy,mesh_cfg", [("dp", None), ("fsdp", shd.MeshConfig(data=2, fsdp=4))])
def test_prompt_only_head_learns_and_items_stay_frozen(strategy, mesh_cfg):
    ex = _toy_problem()
    head = RecheadConfig(variant="prompt_only", dim=16, vocab_size=40)
    items = np.random.default_rng(1).normal(size=(21, 16)).astype(np.float32)
    mesh = shd.make_mesh(mesh_cfg) if mesh_cfg else None
    params = init_rechead(head, jax.random.key(0), {k: v[:2] for k, v in ex.items()})
    state = stage1_state(head, params, items, OptimConfig(lr=3e-3, total_steps=200), jax.random.key(1), mesh,
                         strategy)
    if mesh_cfg:
        assert state.params["items"].sharding.spec[0] == "fsdp"
    state, hist = fit_stage1(state, head, ex, Stage1Config(batch_size=64, epochs=8), mesh)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    np.testing.assert_array_equal(np.asarray(state.params["items"])[:21], items)
    assert state.params["items"].shape[0] % (4 if mesh_cfg else 1) == 0
    u = user_vectors(head, state.params, {k: v[:256] for k, v in ex.items()})
    scores = np.asarray(u) @ items.T
    scores[:, 0] = -np.inf
    assert (scores.argmax(1) == ex["target"][:256]).mean() > 0.3  # chance is 0.05; noise tokens dilute the mean


def test_iterate_batches_pads_last_batch_and_covers_everything():
    ex = {"x": np.arange(10)}
    batches = list(iterate_batches(ex, 4, np.random.default_rng(0), multiple=4))
    assert [len(b["x"]) for b in batches] == [4, 4, 4]
    seen = np.concatenate([b["x"][b["valid"]] for b in batches])
    assert sorted(seen) == list(range(10))


def test_fit_stage1_stopped_and_continued_repeats_the_uninterrupted_fit():
    # 3 epochs of 4 steps with validations every 3 steps: a stop before step 7 (mid-epoch 2) continues exactly,
    # through a JSON round trip of the loop state (same batches, keys, losses, validations and history)
    import json

    from rporec_jax.train.resume import Stopped

    ex = _toy_problem(n=128)
    head = RecheadConfig(variant="prompt_only", dim=8, vocab_size=40)
    items = np.random.default_rng(1).normal(size=(21, 8)).astype(np.float32)
    cfg = Stage1Config(batch_size=32, epochs=3, eval_every=3)

    def fresh():
        params = init_rechead(head, jax.random.key(0), {k: v[:2] for k, v in ex.items()})
        return stage1_state(head, params, items, OptimConfig(lr=3e-3, total_steps=12), jax.random.key(1))

    def on_eval(step, st):
        return {"valid_sum": float(sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(st.params["rechead"])))}

    def strip(hist):
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in hist]

    want_state, want = fit_stage1(fresh(), head, ex, cfg, on_eval=on_eval)
    polls = iter(range(1, 100))
    with pytest.raises(Stopped, match="stage1 at step 6") as stopped:
        fit_stage1(fresh(), head, ex, cfg, on_eval=on_eval, should_stop=lambda: next(polls) > 6)
    state, got = fit_stage1(stopped.value.state, head, ex, cfg, on_eval=on_eval,
                            start=json.loads(json.dumps(stopped.value.loop)))
    assert strip(got) == strip(want) and int(state.step) == 12
    jax.tree_util.tree_map(np.testing.assert_array_equal, shd.to_host(state.params["rechead"]),
                           shd.to_host(want_state.params["rechead"]))
