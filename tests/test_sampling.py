"""Sampler: stops, log-probs vs a full forward, top-k/top-p sets, determinism, G samples, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rporec_jax import sharding as shd
from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params, param_shardings
from rporec_jax.sampling import Sampler, SamplingConfig, _choose, filter_logits
from tiny_tokenizer import make_tiny_tokenizer

CONFIG = DecoderConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_position_embeddings=96)
PROMPTS = [[5, 9, 13, 4, 22], [7, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def model(mesh1):
    params = init_params(CONFIG, jax.random.key(3), mesh1)
    # scale up the logits so greedy/sampled outputs are far from ties
    params["embed"]["embedding"] = params["embed"]["embedding"] * 8
    return Model(CONFIG, params, make_tiny_tokenizer(64), mesh=mesh1)


def _greedy(model, n=12, stop_ids=(63,), **kw):
    return Sampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0, prompt_buckets=(16, 32), **kw),
                   stop_ids=stop_ids)


def test_stop_ids_end_rows_and_pad_the_rest(model):
    free = _greedy(model).generate(PROMPTS, jax.random.key(0))
    assert not free.stopped.any() and (free.lengths == 12).all()
    stop = int(free.tokens[0, 3])  # row 0 must end at its 4th token, the stop token included
    first_hits = [np.flatnonzero(free.tokens[r] == stop) for r in range(3)]
    out = _greedy(model, stop_ids=(stop,)).generate(PROMPTS, jax.random.key(0))
    for r, hits in enumerate(first_hits):
        expect = int(hits[0]) + 1 if len(hits) else 12
        assert out.lengths[r] == expect and out.stopped[r] == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[r, :expect], free.tokens[r, :expect])
        assert (out.tokens[r, expect:] == 0).all() and not out.mask[r, expect:].any()
        assert (out.logprobs[r, expect:] == 0).all()
    assert stop not in model.tokenizer.encode(out.texts[0])  # text excludes the stop token
    assert out.texts[0] == model.tokenizer.decode(free.tokens[0, :3])


def test_stop_strings_cut_text_and_mask(model):
    free = _greedy(model).generate(PROMPTS, jax.random.key(0))
    words = free.texts[1].split()
    stop = " ".join(words[4:6])
    out = _greedy(model, stop_strings=(stop,)).generate(PROMPTS, jax.random.key(0))
    assert out.texts[1] == " ".join(words[:4]) + " " and out.stopped[1]
    assert out.lengths[1] == 6  # through the token that completes the stop string
    assert not out.mask[1, 6:].any()


def test_logprobs_equal_full_forward_recompute(model):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.9, num_samples=2, prompt_buckets=(16,),
                         return_entropies=True)
    out = Sampler(model, cfg, stop_ids=(1,)).generate(PROMPTS, jax.random.key(1))
    tokens = np.concatenate([out.prompt_tokens, out.tokens], 1)
    mask = np.concatenate([out.prompt_mask, out.mask], 1)
    logits = np.asarray(model.apply(model.params, tokens, mask=mask), np.float64) / 0.7
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    plen = out.prompt_tokens.shape[1]
    pred = logp[:, plen - 1:-1]  # position t predicts token t + 1
    want = np.take_along_axis(pred, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs[out.mask], want[out.mask], atol=1e-4)
    ent = -(np.exp(pred) * pred).sum(-1)
    np.testing.assert_allclose(out.entropies[out.mask], ent[out.mask], atol=1e-4)


def test_top_k_and_top_p_sample_only_the_allowed_set():
    logits = jnp.log(jnp.array([[0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]]))
    draws = lambda cfg: np.asarray(jax.vmap(lambda k: _choose(logits, k, cfg))(  # noqa: E731
        jax.random.split(jax.random.key(0), 4000)))[:, 0]
    # top-p 0.75: 0.40 + 0.25 < 0.75 <= 0.80 -> tokens {0, 1, 2}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.75))) == {0, 1, 2}
    assert set(draws(SamplingConfig(temperature=1.0, top_k=4))) == {0, 1, 2, 3}
    assert set(draws(SamplingConfig(temperature=1.0, top_k=2, top_p=0.9))) == {0, 1}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.3))) == {0}
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 0.95)))[0]
    np.testing.assert_array_equal(kept, [1, 1, 1, 1, 1, 0, 0])


def test_deterministic_per_key_and_g_samples_differ(model):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=3, prompt_buckets=(16,))
    s = Sampler(model, cfg, stop_ids=(1,))
    a, b = s.generate(PROMPTS, jax.random.key(7)), s.generate(PROMPTS, jax.random.key(7))
    c = s.generate(PROMPTS, jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert a.tokens.shape == (9, 8)
    np.testing.assert_array_equal(a.prompt_lengths, [5, 5, 5, 2, 2, 2, 9, 9, 9])
    assert len({tuple(a.tokens[i]) for i in range(3)}) > 1  # samples of one prompt differ
    assert s.compilations == 1


def test_greedy_g_samples_repeat_the_single_sample(model):
    one = _greedy(model, n=6).generate(PROMPTS, jax.random.key(0))
    three = Sampler(model, SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=3, prompt_buckets=(16,)),
                    stop_ids=(63,)).generate(PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(three.tokens, np.repeat(one.tokens, 3, axis=0))


def test_bucketing_bounds_compilations(model):
    s = _greedy(model, n=4)
    s.generate([[5, 6]], jax.random.key(0))
    s.generate([[5, 6, 7, 8, 9]], jax.random.key(0))  # same bucket 16, same batch
    assert s.compilations == 1
    s.generate([list(range(2, 22))], jax.random.key(0))  # bucket 32
    assert s.compilations == 2


def test_requests_that_cannot_fit_are_errors(model):
    with pytest.raises(ValueError, match=r"prompt row 1: 90 prompt tokens \+ max_new_tokens 12 = 102 exceeds"):
        _greedy(model).generate([[5], [6] * 90], jax.random.key(0))
    with pytest.raises(ValueError, match="prompt row 0 has 40 tokens, over the largest prompt bucket 32"):
        _greedy(model).generate([[6] * 40], jax.random.key(0))


@pytest.mark.parametrize("strategy,mesh_cfg", [("fsdp", shd.MeshConfig(data=2, fsdp=4)),
                                               ("tp", shd.MeshConfig(data=4, tp=2)),
                                               ("fsdp_tp", shd.MeshConfig(data=1, fsdp=4, tp=2))])
def test_sharded_greedy_equals_one_device(model, strategy, mesh_cfg):
    expected = _greedy(model).generate(PROMPTS, jax.random.key(0))
    mesh = shd.make_mesh(mesh_cfg)
    params = jax.device_put(jax.device_get(model.params), param_shardings(CONFIG, mesh, strategy))
    sharded = Model(CONFIG, params, model.tokenizer, mesh=mesh, strategy=strategy)
    out = _greedy(sharded).generate(PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-4)


def test_rollout_role_holds_weights_without_fsdp(model):
    # fsdp training weights are resharded once per generate call, not gathered at every decoded token
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4))
    params = jax.device_put(jax.device_get(model.params), param_shardings(CONFIG, mesh, "fsdp"))
    sampler = _greedy(Model(CONFIG, params, model.tokenizer, mesh=mesh, strategy="fsdp"))
    assert sampler.strategy == "dp" and shd.inference_strategy("fsdp_tp") == "tp"
    assert all(s.spec == P() or all(a is None for a in s.spec) for s in jax.tree_util.tree_leaves(
        sampler.param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))
    assert shd.inference_strategy({"embed": "fsdp", "mlp": "tp", "heads": ("fsdp", "tp")}) == {"mlp": "tp"}
