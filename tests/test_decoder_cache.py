"""KV-cache decoding equals the full forward; left padding does not change a row's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params

CONFIG = DecoderConfig("qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def model(mesh1):
    return Model(CONFIG, init_params(CONFIG, jax.random.key(0), mesh1), mesh=mesh1)


def _left_pad(rows, width, pad=0):
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return tokens, mask


def test_left_padding_does_not_change_logits(model):
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 64, n) for n in (9, 5, 1)]
    tokens, mask = _left_pad(rows, 12, pad=7)  # a non-zero pad id must not leak either
    padded = np.asarray(model.apply(model.params, tokens, mask=mask))
    for i, r in enumerate(rows):
        alone = np.asarray(model.apply(model.params, r[None]))[0]
        np.testing.assert_allclose(padded[i, 12 - len(r):], alone, atol=1e-5, rtol=1e-5)
    assert np.isfinite(padded).all()  # fully masked padding queries must not produce NaN


def test_prefill_then_decode_matches_full_forward(model):
    rng = np.random.default_rng(1)
    rows = [rng.integers(1, 64, n) for n in (6, 3, 4)]
    prompt, mask = _left_pad(rows, 6)
    steps = 5
    new = rng.integers(1, 64, (3, steps)).astype(np.int32)
    full_tokens = np.concatenate([prompt, new], 1)
    full_mask = np.concatenate([mask, np.ones_like(new, bool)], 1)
    full = np.asarray(model.apply(model.params, full_tokens, mask=full_mask))

    forward = jax.jit(model.forward, static_argnames=("cache_len",))
    cache = model.init_cache(3, 6 + steps + 2)  # spare slots stay invalid and must be ignored
    out = forward(model.params, prompt, mask=mask, cache=cache)
    # padding slots' logits are meaningless; compare the real tokens only
    np.testing.assert_allclose(np.asarray(out.logits)[mask], full[:, :6][mask], atol=1e-5, rtol=1e-5)
    cache = out.cache
    for s in range(steps):
        out = forward(model.params, new[:, s:s + 1], cache=cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, 6 + s], atol=1e-5, rtol=1e-5)
    assert int(cache.index) == 6 + steps

    fresh = forward(model.params, prompt, mask=mask, cache_len=6 + steps + 2).cache  # prefill into a new cache
    prefilled = forward(model.params, prompt, mask=mask, cache=model.init_cache(3, 6 + steps + 2)).cache
    np.testing.assert_array_equal(np.asarray(fresh.valid), np.asarray(prefilled.valid))
    assert int(fresh.index) == int(prefilled.index) == 6
    valid = np.asarray(fresh.valid)[None, :, None, :, None]  # padding slots hold junk either way
    for a, b in [(fresh.k, prefilled.k), (fresh.v, prefilled.v)]:
        np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache.next_positions()), [len(r) + steps for r in rows])


def test_hidden_states_and_unembed(model):
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    out = model.forward(model.params, tokens, compute_logits=False)
    assert out.logits is None and out.hidden.shape == (1, 8, 32)
    np.testing.assert_allclose(np.asarray(model.unembed(model.params, out.hidden)),
                               np.asarray(model.apply(model.params, tokens)), atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients(model, remat):
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    remat_model = Model(CONFIG.replace(remat=remat), model.params)

    def loss(m, p):
        return jnp.mean(m.apply(p, tokens) ** 2)

    g0 = jax.grad(lambda p: loss(model, p))(model.params)
    g1 = jax.grad(lambda p: loss(remat_model, p))(model.params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32(model):
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    bf16 = Model(CONFIG.replace(dtype="bfloat16"), model.params)
    a = np.asarray(model.apply(model.params, tokens))
    b = np.asarray(bf16.apply(model.params, tokens)).astype(np.float32)
    assert bf16.apply(model.params, tokens).dtype == jnp.bfloat16
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 5e-2


def test_unrolled_layer_scan_keeps_values_gradients_and_decoding(model):
    from rporec_jax.sampling import Sampler, SamplingConfig

    unrolled = Model(CONFIG.replace(scan_unroll=0), model.params, mesh=model.mesh)  # 0 = all layers
    tokens = np.arange(1, 9, dtype=np.int32)[None]
    hlo = lambda m: jax.jit(m.apply).lower(model.params, tokens).as_text()  # noqa: E731
    assert "stablehlo.while" in hlo(model) and "stablehlo.while" not in hlo(unrolled)  # no layer loop left
    np.testing.assert_allclose(np.asarray(unrolled.apply(model.params, tokens)),
                               np.asarray(model.apply(model.params, tokens)), atol=1e-6, rtol=1e-5)
    g0 = jax.grad(lambda p: jnp.mean(model.apply(p, tokens) ** 2))(model.params)
    g1 = jax.grad(lambda p: jnp.mean(unrolled.apply(p, tokens) ** 2))(model.params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0, prompt_buckets=(8,))
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    want = Sampler(model, cfg, stop_ids=[-1]).generate(prompts, jax.random.key(0))
    got = Sampler(unrolled, cfg, stop_ids=[-1]).generate(prompts, jax.random.key(0))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="scan_unroll"):
        CONFIG.replace(scan_unroll=CONFIG.num_layers + 1)
