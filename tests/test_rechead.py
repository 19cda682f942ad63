"""Rechead forward vs a PyTorch implementation of the same equations; variants and init checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rporec_jax.models.rechead import Rechead, RecheadConfig, init_rechead, item_vectors
from torch_rechead import TorchTextFusion, load_flax_params

CFG = RecheadConfig(dim=32, vocab_size=50, mlp_hidden=48, encoder_layers=2, encoder_heads=4, encoder_ffn=64)


def _batch(b=5, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("prompt", 12), ("cot", 9), ("answer", 4)):
        out[f"{name}_ids"] = rng.integers(0, 50, (b, n)).astype(np.int32)
        lens = rng.integers(0, n + 1, b)
        out[f"{name}_mask"] = np.arange(n)[None] < lens[:, None]
    out["answer_mask"][0] = False  # an empty answer encodes to the zero vector
    out["format"] = np.array([1, 0, 1, 1, 0][:b], np.int32)
    return out


def _randomise(params, key):
    """Random values everywhere (LayerNorm scales/biases too) so no mapping error hides behind ones/zeros."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in
                                                  zip(leaves, keys)])


def test_text_fusion_matches_torch_equations():
    batch = _batch()
    params = _randomise(nn.unbox(init_rechead(CFG, jax.random.key(0), batch))["user"], jax.random.key(1))
    ours = np.asarray(Rechead(CFG).apply({"params": params}, batch))
    ref = TorchTextFusion(50, 32, 48, 2, 4, 64).eval()
    load_flax_params(ref, jax.device_get(params))
    with torch.no_grad():
        expected = ref({k: torch.as_tensor(np.array(v)) for k, v in batch.items()}).numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=2e-5)


def test_format_flag_switches_between_prompt_and_answer():
    batch = _batch()
    params = nn.unbox(init_rechead(CFG, jax.random.key(0), batch))["user"]
    u = lambda b: np.asarray(Rechead(CFG).apply({"params": params}, b))  # noqa: E731
    changed = dict(batch, answer_ids=(batch["answer_ids"] + 1) % 50)
    diff = np.abs(u(batch) - u(changed)).max(-1)
    assert (diff[batch["format"] == 0] < 1e-6).all()  # f = 0: the answer is not an input at all
    assert (diff[(batch["format"] == 1) & batch["answer_mask"].any(-1)] > 1e-3).all()


def test_dropout_is_active_only_in_training():
    batch = _batch()
    params = nn.unbox(init_rechead(CFG, jax.random.key(0), batch))["user"]
    a = Rechead(CFG).apply({"params": params}, batch, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = Rechead(CFG).apply({"params": params}, batch, deterministic=False, rngs={"dropout": jax.random.key(2)})
    c = Rechead(CFG).apply({"params": params}, batch)
    assert not np.allclose(a, b) and np.allclose(c, Rechead(CFG).apply({"params": params}, batch))


def test_prompt_only_ignores_reasoning_and_hidden_state_projects_items():
    batch = _batch()
    cfg = RecheadConfig(variant="prompt_only", dim=32, vocab_size=50)
    params = nn.unbox(init_rechead(cfg, jax.random.key(0), batch))["user"]
    assert set(params) == {"mlp_p", "tower_prompt"}
    hs = RecheadConfig(variant="hidden_state", dim=16, input_dim=24)
    p = nn.unbox(init_rechead(hs, jax.random.key(0), {"hidden": jnp.zeros((2, 24))}))
    items = item_vectors(hs, p, jnp.ones((7, 24)))
    assert items.shape == (7, 16)
    assert Rechead(hs).apply({"params": p["user"]}, {"hidden": jnp.ones((3, 24))}).shape == (3, 16)


def test_tower_init_seeds_all_towers_and_checks_shape():
    table = np.random.default_rng(0).normal(size=(50, 32)).astype(np.float32)
    p = nn.unbox(init_rechead(CFG, jax.random.key(0), _batch(), tower_init=table))["user"]
    for name in ("tower_prompt", "tower_cot", "tower_answer"):
        np.testing.assert_array_equal(np.asarray(p[name]["embedding"]), table)
    with pytest.raises(ValueError, match=r"tower_init has shape \(50, 16\)"):
        init_rechead(CFG, jax.random.key(0), _batch(), tower_init=table[:, :16])
