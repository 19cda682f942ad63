"""Sharded forward on 8 fake CPU devices equals the unsharded one for every strategy; memory shrinks."""

import re

import jax
import numpy as np
import pytest

from rporec_jax import sharding as shd
from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params, param_shardings

CONFIG = DecoderConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
MESHES = {"dp": shd.MeshConfig(data=8), "fsdp": shd.MeshConfig(data=1, fsdp=8),
          "tp": shd.MeshConfig(data=4, tp=2), "fsdp_tp": shd.MeshConfig(data=1, fsdp=4, tp=2)}


@pytest.fixture(scope="module")
def reference(mesh1):
    params = init_params(CONFIG, jax.random.key(0), mesh1)
    tokens = np.random.default_rng(0).integers(0, 128, (8, 16)).astype(np.int32)
    model = Model(CONFIG, params, mesh=mesh1)
    return jax.device_get(params), tokens, np.asarray(model.apply(params, tokens))


def test_eight_fake_devices_exist():
    assert jax.device_count() == 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("strategy", sorted(MESHES))
def test_sharded_forward_equals_unsharded(strategy, reference):
    host_params, tokens, expected = reference
    mesh = shd.make_mesh(MESHES[strategy])
    shardings = param_shardings(CONFIG, mesh, strategy)
    params = jax.device_put(host_params, shardings)
    model = Model(CONFIG, params, mesh=mesh, strategy=strategy)
    fwd = jax.jit(model.apply, in_shardings=(shardings, shd.batch_sharding(mesh)),
                  out_shardings=shd.batch_sharding(mesh, 3))
    out = fwd(params, tokens)
    assert out.sharding.spec[0] == shd.BATCH_AXES
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy,max_fraction", [("dp", 1.0), ("fsdp", 1 / 8), ("tp", 1 / 2), ("fsdp_tp", 1 / 8)])
def test_per_device_param_bytes(strategy, max_fraction, reference):
    host_params = reference[0]
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(host_params))
    mesh = shd.make_mesh(MESHES[strategy])
    params = jax.device_put(host_params, param_shardings(CONFIG, mesh, strategy))
    per_device = shd.bytes_per_device(params)
    assert len(per_device) == 8
    # norms stay replicated, so allow a little slack over the ideal fraction
    assert max(per_device.values()) <= total * max_fraction * 1.05 + 4096
    if max_fraction < 1:
        assert max(per_device.values()) < total * 0.6


def test_indivisible_strategy_fails_with_a_clear_message():
    smollm_like = CONFIG.replace(num_heads=9, num_kv_heads=3, hidden_size=576, head_dim=64)
    with pytest.raises(ValueError, match=r"k'\]\['kernel'\].*'kv_heads', size 3.*\('tp',\)|kv_heads.*size 3"):
        param_shardings(smollm_like, shd.make_mesh(shd.MeshConfig(data=1, tp=8)), "tp")


def test_mesh_config_resolves_and_rejects():
    assert shd.MeshConfig(data=-1, fsdp=2, tp=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        shd.MeshConfig(data=3, fsdp=2, tp=1).resolve(8)
    with pytest.raises(ValueError, match="at most one"):
        shd.MeshConfig(data=-1, fsdp=-1).resolve(8)
    with pytest.raises(ValueError, match="unknown sharding strategy"):
        shd.logical_rules("zero3")
    with pytest.raises(ValueError, match="unknown mesh axis"):
        shd.logical_rules({"embed": "model"})


def test_user_defined_strategy_table():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4))
    shardings = param_shardings(CONFIG, mesh, {"mlp": "fsdp", "vocab": ("data", "fsdp")})
    assert shardings["layers"]["mlp"]["up"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert shardings["embed"]["embedding"].spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
def test_activations_at_block_boundaries_follow_the_strategy(strategy, reference):
    # The decoder pins [batch, seq, embed] activations to batch over ('data', 'fsdp'), embed replicated: under
    # fsdp, XLA would otherwise be free to keep activations split over embed like the weights they meet.
    host_params, tokens, expected = reference
    mesh = shd.make_mesh(MESHES[strategy])
    params = jax.device_put(host_params, param_shardings(CONFIG, mesh, strategy))
    model = Model(CONFIG, params, mesh=mesh, strategy=strategy)
    assert model.module.activation_sharding == shd.activation_sharding(mesh, strategy)
    text = jax.jit(model.apply).lower(params, tokens).as_text()
    pinned = 'sdy.sharding_constraint %s <@mesh, [{"data", "fsdp"}, {}, {}]>'
    assert len(re.findall(re.escape(pinned).replace("%s", r"%\d+"), text)) >= 2  # after embed and a block
    np.testing.assert_allclose(np.asarray(model.apply(params, tokens)), expected, atol=1e-5, rtol=1e-5)
    assert model.apply(params, tokens[:3]).shape[0] == 3  # a batch the mesh does not divide is left unpinned
