"""GRPO loss: NumPy reference per clip case / KL estimator / aggregation / entropy mask / forced tokens, gradients,
chunked log-probs vs full logits, zero KL at the reference, group advantages, exact micro-batch accumulation, and
the stage-2 update leaving budget forcing's tokens out of the loss."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rporec_jax.grpo_loss import (AGGREGATIONS, KL_ESTIMATORS, GRPOLossConfig, accumulate_gradients, action_mask,
                                  completion_logprobs, group_advantages, grpo_loss, grpo_norm,
                                  split_micro_batches)
from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params

# one layer keeps compile times low; log-prob chunking only touches the final hidden states and unembedding
CONFIG = DecoderConfig("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=8, max_position_embeddings=64)


# ---------------------------------------------------------------------------------------------------------------
# NumPy reference (float64, explicit loops)
# ---------------------------------------------------------------------------------------------------------------

def np_grpo_loss(logp, old, ref, adv, mask, ent, cfg, forced=None):
    """Returns (loss, metrics) computed token by token in float64; tokens in `forced` (budget forcing wrote them)
    are not actions: no policy-gradient, KL or entropy term, and not counted."""
    logp, old, adv = (np.asarray(a, np.float64) for a in (logp, old, adv))
    mask = np.asarray(mask, bool)
    if forced is not None:
        mask = mask & ~np.asarray(forced, bool)
    r, n = logp.shape
    if cfg.entropy_quantile is not None:
        thr = np.quantile(np.asarray(ent, np.float64)[mask], 1.0 - cfg.entropy_quantile)
        emask = (np.asarray(ent) >= thr) & mask
    else:
        emask = mask.copy()
    pg = np.zeros((r, n))
    kl = np.zeros((r, n))
    low = high = ratio_sum = 0.0
    for i in range(r):
        for t in range(n):
            if not mask[i, t]:
                continue
            ratio = np.exp(np.clip(logp[i, t] - old[i, t], -cfg.max_log_ratio, cfg.max_log_ratio))
            ratio_sum += ratio
            a = adv[i]
            pg[i, t] = -min(ratio * a, np.clip(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
            low += ratio < 1 - cfg.eps_low and a < 0
            high += ratio > 1 + cfg.eps_high and a > 0
            if ref is not None:
                d = float(ref[i, t]) - logp[i, t]
                kl[i, t] = {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1}[cfg.kl_estimator]
    per_token = pg * emask + cfg.beta * kl

    def agg(x):
        if cfg.aggregation == "token_mean":
            return (x * mask).sum() / mask.sum()
        if cfg.aggregation == "seq_mean_token_mean":
            return np.mean([(x[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(r)])
        return np.mean([(x[i] * mask[i]).sum() / (cfg.max_completion_len or n) for i in range(r)])

    tokens = mask.sum()
    return agg(per_token), {"pg_loss": agg(pg * emask), "kl": agg(kl), "clip_frac_low": low / tokens,
                            "clip_frac_high": high / tokens, "ratio_mean": ratio_sum / tokens,
                            "entropy_mask_frac": emask.sum() / tokens}


def random_inputs(seed, r=6, n=9):
    """Returns (logp, old, ref, adv, mask, ent) with ragged masks, ratios on both sides of the clip range."""
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 4.0, (r, n)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (r, n))).astype(np.float32)  # ratios spread over ~[0.4, 2.5]
    ref = (logp + rng.normal(0, 0.3, (r, n))).astype(np.float32)
    adv = rng.normal(0, 1, r).astype(np.float32)
    lengths = rng.integers(1, n + 1, r)
    lengths[0] = n
    mask = np.arange(n)[None] < lengths[:, None]
    ent = rng.uniform(0, 3, (r, n)).astype(np.float32)
    # make sure both clipped sides occur: row 0 clipped high (A > 0), row 1 clipped low (A < 0)
    adv[0], adv[1] = abs(adv[0]) + 0.5, -abs(adv[1]) - 0.5
    old[0, 0], old[1, 0] = logp[0, 0] - np.log(1.6), logp[1, 0] - np.log(0.5)
    # garbage outside the mask must not matter
    logp[~mask] = 50.0
    old[~mask] = -50.0
    return logp, old, ref, adv, mask, ent


def _check(cfg, inputs, rtol=2e-5):
    logp, old, ref, adv, mask, ent = inputs
    loss, metrics = jax.jit(lambda *a: grpo_loss(*a, cfg))(logp, old, ref, adv, mask, ent)
    want, want_metrics = np_grpo_loss(logp, old, ref, adv, mask, ent, cfg)
    np.testing.assert_allclose(float(loss), want, rtol=rtol, atol=1e-6)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=rtol, atol=1e-6, err_msg=k)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# Loss vs NumPy
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("entropy_quantile", [None, 0.2])
def test_loss_matches_numpy(aggregation, kl_estimator, entropy_quantile):
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.05, kl_estimator=kl_estimator,
                         entropy_quantile=entropy_quantile, aggregation=aggregation)
    inputs = random_inputs(zlib.crc32(f"{aggregation}{kl_estimator}{entropy_quantile}".encode()))
    _, metrics = _check(cfg, inputs)
    # the random inputs exercise both clip sides and a non-trivial entropy mask
    assert float(metrics["clip_frac_low"]) > 0 and float(metrics["clip_frac_high"]) > 0
    if entropy_quantile is not None:
        assert 0 < float(metrics["entropy_mask_frac"]) < 1


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_forced_tokens_are_not_actions(aggregation):
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.05, entropy_quantile=0.2, aggregation=aggregation)
    logp, old, ref, adv, mask, ent = random_inputs(11)
    forced = mask & (np.random.default_rng(1).uniform(size=mask.shape) < 0.3)
    forced[0, 0] = True  # a clipped token: only its exclusion changes the clip fractions
    actions = action_mask(jnp.asarray(mask), jnp.asarray(forced))
    loss, metrics = jax.jit(lambda *a: grpo_loss(*a, cfg))(logp, old, ref, adv, actions, ent)
    want, want_metrics = np_grpo_loss(logp, old, ref, adv, mask, ent, cfg, forced=forced)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
    everything, _ = np_grpo_loss(logp, old, ref, adv, mask, ent, cfg)
    assert abs(want - everything) > 1e-3  # the forced tokens would have mattered


def test_loss_without_reference_and_max_len_scale():
    inputs = random_inputs(7)
    cfg = GRPOLossConfig(beta=0.0, entropy_quantile=None, aggregation="seq_mean_token_scale",
                         max_completion_len=16)
    logp, old, _, adv, mask, ent = inputs
    _check(cfg, (logp, old, None, adv, mask, ent))
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, ent, dataclasses.replace(cfg, beta=0.1))
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(logp, old, None, adv, mask, None, dataclasses.replace(cfg, entropy_quantile=0.2))


# One token per clip case: (ratio, advantage, clipped?). Clipped tokens carry no gradient.
CLIP_CASES = [
    (1.5, +1.0, True),   # above 1+eps, A > 0: clipped
    (1.5, -1.0, False),  # above 1+eps, A < 0: unclipped (pessimistic side)
    (0.5, -1.0, True),   # below 1-eps, A < 0: clipped
    (0.5, +1.0, False),  # below 1-eps, A > 0: unclipped
    (1.1, +1.0, False),  # inside the trust region
    (0.9, -1.0, False),
]


@pytest.mark.parametrize("ratio,adv,clipped", CLIP_CASES)
def test_each_clip_case_value_and_gradient(ratio, adv, clipped):
    cfg = GRPOLossConfig(beta=0.0, entropy_quantile=None)
    logp = np.full((1, 2), -1.0, np.float32)
    old = logp - np.float32(np.log(ratio))
    mask = np.array([[True, False]])
    advs = np.array([adv], np.float32)
    loss, metrics = _check(cfg, (logp, old, None, advs, mask, None))
    want_loss = -min(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert float(metrics["clip_frac_low"] + metrics["clip_frac_high"]) == float(clipped)
    grad = jax.grad(lambda lp: grpo_loss(lp, old, None, advs, mask, None, cfg)[0])(jnp.asarray(logp))
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and grad[0, 1] == 0  # padding: no gradient
    if clipped:
        assert grad[0, 0] == 0
    else:  # d/dlogp of -ratio*A = -ratio*A
        np.testing.assert_allclose(grad[0, 0], -ratio * adv, rtol=1e-5)


def test_log_ratio_clamp_keeps_huge_ratios_finite():
    cfg = GRPOLossConfig(beta=0.0, entropy_quantile=None, max_log_ratio=20.0)
    logp = np.array([[0.0, 0.0]], np.float32)
    old = np.array([[-200.0, 200.0]], np.float32)  # log-ratios +-200: exp overflows without the clamp
    adv = np.array([-1.0], np.float32)
    mask = np.ones((1, 2), bool)
    loss, metrics = grpo_loss(logp, old, None, adv, mask, None, cfg)
    np.testing.assert_allclose(float(loss), (np.exp(20.0) + 0.8) / 2, rtol=1e-5)
    grad = jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, None, cfg)[0])(jnp.asarray(logp))
    assert np.isfinite(np.asarray(grad)).all()


def test_gradient_where_expected_entropy_mask_and_kl():
    logp, old, ref, adv, mask, ent = random_inputs(3)
    old = logp.copy()  # ratio 1: nothing clipped, so every PG token has gradient -A/len
    old[~mask] = -50.0
    adv = np.where(np.abs(adv) < 0.1, 0.5, adv).astype(np.float32)
    cfg = GRPOLossConfig(beta=0.0, entropy_quantile=0.2)
    grad_fn = jax.jit(jax.grad(lambda lp, c: grpo_loss(lp, old, ref, adv, mask, ent, c)[0]), static_argnums=1)
    g = np.asarray(grad_fn(jnp.asarray(logp), cfg))
    thr = np.quantile(ent[mask], 0.8)
    top = (ent >= thr) & mask
    assert np.isfinite(g).all()
    assert (g[top] != 0).all() and (g[~top] == 0).all()  # PG only on high-entropy valid tokens
    lengths = mask.sum(1, keepdims=True)
    np.testing.assert_allclose(g[top], np.broadcast_to(-adv[:, None] / lengths / len(adv), g.shape)[top],
                               rtol=1e-5)
    # with KL, every valid token gets gradient, padding still none, even where padding log-probs would make
    # exp(ref - logp) overflow
    logp[~mask] = -150.0
    g_kl = np.asarray(grad_fn(jnp.asarray(logp), dataclasses.replace(cfg, beta=0.1)))
    assert np.isfinite(g_kl).all() and (g_kl[mask] != 0).all() and (g_kl[~mask] == 0).all()


def test_entropy_mask_is_not_differentiated():
    logp, old, ref, adv, mask, ent = random_inputs(5)
    cfg = GRPOLossConfig(beta=0.01, entropy_quantile=0.2)
    g = jax.grad(lambda e: grpo_loss(logp, old, ref, adv, mask, e, cfg)[0])(jnp.asarray(ent))
    assert (np.asarray(g) == 0).all()
    g_ref = jax.grad(lambda r: grpo_loss(logp, old, r, adv, mask, ent, cfg)[0])(jnp.asarray(ref))
    assert (np.asarray(g_ref) == 0).all()  # the reference is a constant too


# ---------------------------------------------------------------------------------------------------------------
# Chunked log-probs and the KL at the reference (tiny random decoder)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(mesh1):
    params = init_params(CONFIG, jax.random.key(11), mesh1)
    params["embed"]["embedding"] = params["embed"]["embedding"] * 4  # peaky, non-uniform distributions
    return Model(CONFIG, params, mesh=mesh1)


def rollout_batch(seed=0, r=4, p=6, n=11):
    """Returns left-padded prompt tokens/mask `[r, p]` and completion tokens/mask `[r, n]` (ragged)."""
    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(1, p + 1, r)
    prompt_mask = np.arange(p)[None] >= (p - prompt_len)[:, None]
    prompt = np.where(prompt_mask, rng.integers(1, 64, (r, p)), 0).astype(np.int32)
    lengths = rng.integers(1, n + 1, r)
    lengths[0] = n
    mask = np.arange(n)[None] < lengths[:, None]
    tokens = np.where(mask, rng.integers(1, 64, (r, n)), 0).astype(np.int32)
    return prompt, prompt_mask, tokens, mask


def full_logit_logprobs(model, params, prompt, prompt_mask, tokens, mask, temperature):
    """Returns log-probs and entropies `[r, n]` from the full `[r, p+n, vocab]` logits."""
    p, n = prompt.shape[1], tokens.shape[1]
    seq = jnp.concatenate([prompt, tokens], 1)
    logits = model.apply(params, seq, mask=jnp.concatenate([prompt_mask, mask], 1)).astype(jnp.float32)
    logits = logits[:, p - 1:p + n - 1] / temperature
    logp_all = jax.nn.log_softmax(logits, -1)
    logp = jnp.take_along_axis(logp_all, tokens[..., None], -1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, -1)
    return jnp.where(mask, logp, 0.0), jnp.where(mask, ent, 0.0)


def test_chunked_logprobs_equal_full_logits(model):
    batch = rollout_batch()
    temperature = 0.7
    want_lp, want_ent = jax.jit(lambda prm, *b: full_logit_logprobs(model, prm, *b, temperature))(
        model.params, *batch)
    assert float(jnp.abs(want_lp).max()) > 0.5  # a non-trivial distribution
    for chunk in (3, 32):  # 3 does not divide 11 (a padded last chunk); 32 exceeds it (one chunk)
        fn = jax.jit(lambda prm, *b: completion_logprobs(model, prm, *b, temperature, chunk_size=chunk,
                                                         return_entropy=True))
        lp, ent = fn(model.params, *batch)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(want_lp), rtol=1e-5, atol=1e-5, err_msg=str(chunk))
        np.testing.assert_allclose(np.asarray(ent), np.asarray(want_ent), rtol=1e-5, atol=1e-5)
        assert (np.asarray(lp)[~batch[3]] == 0).all()


def _avals(jaxpr):
    """Yields the abstract values of every equation output in a jaxpr and its sub-jaxprs (scan, remat, jit)."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_no_full_logits_forward_or_backward(model):
    prompt, prompt_mask, tokens, mask = rollout_batch(4, r=4, p=6, n=12)
    chunk, vocab = 4, CONFIG.vocab_size
    loss = lambda prm: jnp.sum(completion_logprobs(model, prm, prompt, prompt_mask, tokens, mask, 1.0,  # noqa
                                                   chunk_size=chunk, return_entropy=True)[1])
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(model.params).jaxpr
    shapes = [a.shape for a in _avals(jaxpr) if hasattr(a, "shape")]
    assert (4, chunk, vocab) in shapes  # the per-chunk logits exist...
    big = [s for s in shapes if s and s[-1] == vocab and np.prod(s) > 4 * chunk * vocab]
    assert not big, big  # ...but nothing holding more than one chunk's logits (e.g. stacked residuals)


def test_kl_is_zero_when_policy_equals_reference(model):
    prompt, prompt_mask, tokens, mask = rollout_batch(2)
    fn = jax.jit(lambda prm: completion_logprobs(model, prm, prompt, prompt_mask, tokens, mask, 1.0, chunk_size=5))
    lp = fn(model.params)
    ref = fn(jax.tree_util.tree_map(jnp.copy, model.params))  # a separate frozen copy of the same weights
    adv = jnp.asarray([1.0, -1.0, 0.5, -0.5])
    for kl_estimator in KL_ESTIMATORS:
        cfg = GRPOLossConfig(beta=0.5, kl_estimator=kl_estimator, entropy_quantile=None)
        loss, metrics = grpo_loss(lp, lp, ref, adv, mask, None, cfg)
        assert float(metrics["kl"]) == 0.0, kl_estimator
        loss0, _ = grpo_loss(lp, lp, ref, adv, mask, None, dataclasses.replace(cfg, beta=0.0))
        assert float(loss) == float(loss0), kl_estimator
        # a different reference gives a non-zero KL (the checks above can fail)
        _, m2 = grpo_loss(lp, lp, ref + 0.3 * jnp.asarray(mask, jnp.float32), adv, mask, None, cfg)
        assert float(m2["kl"]) != 0, kl_estimator


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_advantages_match_numpy(mode, ddof):
    g = 4
    rewards = np.random.default_rng(ddof).uniform(0, 1, 3 * g).astype(np.float32)
    rewards[g:2 * g] = 0.7  # a constant group: zero advantage in every mode
    got = np.asarray(group_advantages(jnp.asarray(rewards), g, mode, eps=1e-4, ddof=ddof))
    want = np.zeros_like(rewards, np.float64)
    for i in range(len(rewards)):
        grp = rewards[(i // g) * g:(i // g + 1) * g].astype(np.float64)
        if mode == "grpo":
            want[i] = (rewards[i] - grp.mean()) / (grp.std(ddof=ddof) + 1e-4)
        elif mode == "drgrpo":
            want[i] = rewards[i] - grp.mean()
        else:
            want[i] = rewards[i] - (grp.sum() - rewards[i]) / (g - 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got[g:2 * g]).max() < 1e-5
    with pytest.raises(ValueError):
        group_advantages(jnp.asarray(rewards[:-1]), g, mode)


# ---------------------------------------------------------------------------------------------------------------
# Micro-batch gradient accumulation
# ---------------------------------------------------------------------------------------------------------------

def _toy_batch(seed, r=8, n=7, vocab=5, feat=3):
    """Returns a toy rollout batch for a linear softmax policy: features, tokens, masks, old/ref log-probs."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, n + 1, r)
    mask = np.arange(n)[None] < lengths[:, None]
    return {"x": rng.normal(size=(r, n, feat)).astype(np.float32), "tokens": rng.integers(0, vocab, (r, n)),
            "mask": mask, "old": -rng.uniform(0.5, 2.5, (r, n)).astype(np.float32),
            "ref": -rng.uniform(0.5, 2.5, (r, n)).astype(np.float32),
            "ent": rng.uniform(0, 2, (r, n)).astype(np.float32), "adv": rng.normal(size=r).astype(np.float32)}


def _toy_logp(w, b):
    logits = b["x"] @ w
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), b["tokens"][..., None], -1)[..., 0]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_accumulation_equals_full_batch(aggregation):
    batch = _toy_batch(4)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
    cfg = GRPOLossConfig(beta=0.05, entropy_quantile=0.3, aggregation=aggregation)
    norm = grpo_norm(batch["mask"], batch["ent"], cfg)

    def loss_fn(params, b, norm=None):
        return grpo_loss(_toy_logp(params, b), b["old"], b["ref"], b["adv"], b["mask"], b["ent"], cfg, norm)

    (full_loss, _), full_grad = jax.value_and_grad(loss_fn, has_aux=True)(w, batch)
    assert np.abs(np.asarray(full_grad)).max() > 0
    for num_micro in (2, 4):
        loss, grad, aux = jax.jit(lambda p, mb: accumulate_gradients(lambda q, b: loss_fn(q, b, norm), p, mb))(
            w, split_micro_batches(batch, num_micro))
        np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(full_grad), rtol=1e-4, atol=1e-7)
        assert aux["kl"].shape == (num_micro,)


def test_chunked_micro_batched_gradient_equals_full_logit_full_batch_gradient(model):
    # one test for two claims (each compile of the decoder's gradient costs seconds): the chunked,
    # rematerialised log-probs differentiate like full-logit ones, and 2 micro-batches sum to the full batch
    prompt, prompt_mask, tokens, mask = rollout_batch(3)
    rng = np.random.default_rng(9)
    temperature = 0.8
    old, _ = full_logit_logprobs(model, model.params, prompt, prompt_mask, tokens, mask, temperature)
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask,
             "old": old + jnp.asarray(rng.normal(0, 0.3, mask.shape), jnp.float32),
             "ent": jnp.asarray(rng.uniform(0, 2, mask.shape), jnp.float32),
             "adv": jnp.asarray([1.0, -0.5, 0.25, -1.0])}
    cfg = GRPOLossConfig(beta=0.1, entropy_quantile=0.5)
    norm = grpo_norm(batch["mask"], batch["ent"], cfg)

    def loss_from(lp, b):
        return grpo_loss(lp, b["old"], b["old"], b["adv"], b["mask"], b["ent"], cfg, norm)

    def chunked_loss(params, b):
        return loss_from(completion_logprobs(model, params, b["prompt"], b["prompt_mask"], b["tokens"], b["mask"],
                                             temperature, chunk_size=4), b)

    def full_loss(params):
        return loss_from(full_logit_logprobs(model, params, prompt, prompt_mask, tokens, mask, temperature)[0],
                         batch)[0]

    full = jax.jit(jax.grad(full_loss))(model.params)
    _, acc, _ = jax.jit(lambda p, mb: accumulate_gradients(chunked_loss, p, mb))(model.params,
                                                                                 split_micro_batches(batch, 2))
    for a, b in zip(jax.tree_util.tree_leaves(acc), jax.tree_util.tree_leaves(full)):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# The stage-2 update with budget forcing's tokens
# ---------------------------------------------------------------------------------------------------------------

def test_policy_update_conditions_on_forced_tokens_but_leaves_them_out_of_the_loss(model):
    from rporec_jax.train.stage2 import Stage2Config, policy_update, stage2_state
    from rporec_jax.train.state import OptimConfig, TrainState, add_params

    prompt, prompt_mask, tokens, mask = rollout_batch(5)
    rng = np.random.default_rng(2)
    forced = mask & (rng.uniform(size=mask.shape) < 0.35)  # forced tokens amid sampled ones, as the sampler writes
    cfg = Stage2Config(batch_size=2, num_samples=2, temperature=0.8, logprob_chunk=4, use_rollout_logprobs=True,
                       loss=GRPOLossConfig(eps_low=0.2, eps_high=0.28, beta=0.1, entropy_quantile=0.5),
                       optim=OptimConfig(lr=1e-3, weight_decay=0.0))
    reference = jax.tree_util.tree_map(lambda x: x * 1.05, model.params)  # KL to a reference that differs
    state = add_params("reference", reference)(stage2_state(
        TrainState.create({"rechead": {}, "items": jnp.zeros(1)}, jax.random.key(0)), model.params, cfg.optim))
    logp = full_logit_logprobs(model, model.params, prompt, prompt_mask, tokens, mask, 0.8)[0]
    ref = full_logit_logprobs(model, reference, prompt, prompt_mask, tokens, mask, 0.8)[0]
    batch = {"prompt_tokens": prompt, "prompt_mask": prompt_mask, "tokens": tokens, "mask": mask, "forced": forced,
             "old_logp": np.asarray(logp) + rng.normal(0, 0.3, mask.shape).astype(np.float32),
             "entropies": rng.uniform(0, 2, mask.shape).astype(np.float32),
             "advantages": np.asarray([1.0, -0.5, 0.25, -1.0], np.float32)}
    _, metrics = jax.jit(lambda s, b: policy_update(model, cfg, s, b))(state, batch)
    # the reference's log-probs condition on the whole completion, forced tokens included; only actions count
    want, want_metrics = np_grpo_loss(logp, batch["old_logp"], ref, batch["advantages"], mask, batch["entropies"],
                                      cfg.loss, forced=forced)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4, atol=1e-6)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-4, atol=1e-6, err_msg=k)
    everything, _ = np_grpo_loss(logp, batch["old_logp"], ref, batch["advantages"], mask, batch["entropies"],
                                 cfg.loss)
    assert abs(want - everything) > 1e-3  # the forced tokens would have mattered
