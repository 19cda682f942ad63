"""GRPO stage 2 end to end on the synthetic dataset with a tiny random backbone: learning, determinism,
sharding invariance, Rechead refresh, the full reward with summaries, and the hidden_state reward."""

import dataclasses

import jax
import numpy as np
import pytest

from rporec_jax import sharding as shd
from rporec_jax.data import DataConfig, SyntheticConfig, load_dataset
from rporec_jax.models.rechead import RecheadConfig, init_rechead
from rporec_jax.models.tiny import tiny_decoder, word_static_encoder
from rporec_jax.rewards import RewardConfig
from rporec_jax.sampling import ForceFormat
from rporec_jax.train.features import item_matrix, rechead_examples
from rporec_jax.train.stage1 import stage1_state
from rporec_jax.grpo_loss import GRPOLossConfig, group_advantages
from rporec_jax.train.stage2 import GRPOTrainer, Stage2Config, batch_indices, fit_stage2, make_update_step, \
    stage2_state
from rporec_jax.train.state import OptimConfig

# A random tiny model never writes the tags, so completions are read as an open <think> (the whole text is
# the CoT) and the format gate is off: the Rechead NDCG and CoT-entropy terms then vary between samples,
# a real signal the rollout -> reward -> update loop must pick up.
NO_GATE = RewardConfig(format_gate=False, w_comp=0.0, w_sim=0.0)
CFG = Stage2Config(steps=12, batch_size=2, num_samples=4, max_new_tokens=12, prompt_buckets=(512, 1024),
                   reward=NO_GATE, optim=OptimConfig(lr=5e-2, weight_decay=0.0, grad_clip=1.0),
                   loss=GRPOLossConfig(beta=0.001), length_bucket=4, logprob_chunk=8, log_samples=2, seed=3,
                   assume_think_open=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ds = load_dataset(DataConfig(source=SyntheticConfig(num_users=40, seed=0, max_len=8), num_negatives=9),
                      out_root=tmp_path_factory.mktemp("datasets"))
    texts = ds.item_texts[1:] + [ds.manifest["instruction"], ds.prompt_builder().user_content([1])]
    enc = word_static_encoder(texts, dim=32)
    head = RecheadConfig(variant="text_fusion", dim=32, vocab_size=enc.config.vocab_size, encoder_layers=1,
                         encoder_heads=4, encoder_ffn=64)
    example = {k: v[:2] for k, v in rechead_examples(ds, "train", enc, limit=2).items()}
    head_params = init_rechead(head, jax.random.key(0), example)
    items = item_matrix(enc, ds.item_texts, use_cache=False)
    return dict(ds=ds, texts=texts, enc=enc, head=head, head_params=head_params, items=items)


def _setup(world, mesh, strategy="dp", cfg=CFG, head=None, head_params=None, items=None, limit=16,
           whole_tags=False):
    model = tiny_decoder(world["texts"], jax.random.key(1), mesh, strategy, logit_scale=4.0, whole_tags=whole_tags)
    head = head or world["head"]
    s1 = stage1_state(head, head_params or world["head_params"], world["items"] if items is None else items,
                      OptimConfig(), jax.random.key(2), mesh, strategy)
    state = stage2_state(s1, model.params, cfg.optim)
    return GRPOTrainer(model, head, world["enc"], world["ds"], cfg, mesh, limit=limit), state


def _comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def test_batch_indices_are_epoch_permutations():
    steps = [batch_indices(10, 4, s, seed=1) for s in range(5)]
    flat = np.concatenate(steps)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))
    np.testing.assert_array_equal(batch_indices(10, 4, 3, seed=1), steps[3])  # a pure function of the step
    assert not np.array_equal(batch_indices(10, 4, 0, seed=2), steps[0])


class _TokenSetReward:
    """A reward one token class decides: the fraction of a completion's tokens in `target` (0 when empty).

    Its optimum is unambiguous (only tokens of `target`) and every sampled token carries signal, so a working
    policy gradient moves the policy's probability of `target` by far more than rounding or sampling noise;
    a flipped gradient sign or a broken advantage moves it the other way or not at all."""

    def __init__(self, target: np.ndarray):
        self.target = target

    def rewards(self, out) -> np.ndarray:
        hit = np.isin(out.tokens, self.target) & out.mask
        return hit.sum(1) / np.maximum(out.mask.sum(1), 1)

    def score(self, params, prompt_texts, prompt_ids, out, records):
        from rporec_jax.train.rollout_scoring import Scored

        r = self.rewards(out).astype(np.float32)
        return Scored(r, {"token_set": r}, {"reward/total": float(r.mean()), "reward/format": 0.0}, None)


def _first_token_mass(trainer, params, target) -> np.ndarray:
    """Returns the policy's exact probability of `target` as the first completion token, per prompt `[P]`."""
    out = []
    for ids in trainer.prompt_ids:
        logits = trainer.model.apply(params, np.asarray([ids], np.int32))[0, -1]
        out.append(float(jax.nn.softmax(logits.astype(np.float32))[target].sum()))
    return np.asarray(out)


def test_grpo_learns_a_reward_one_token_class_decides(world, mesh1):
    # Half the vocabulary is "right". Measured on the policy itself, not on the rewards of its own trajectory:
    # (a) the exact probability of a right first token (a deterministic function of the parameters) and (b) the
    # reward of 128 fresh samples, with its standard error. Measured (AMD EPYC, no AVX-512): (a) 0.51 -> 0.9999,
    # (b) 0.48 -> 0.999 (se 0.015). Broken on purpose: the policy-gradient sign flipped, or the advantages'
    # sign flipped: (a) 0.51 -> 0.003; each advantage given to its group neighbour's sample: (a) 0.51 -> 0.05.
    cfg = dataclasses.replace(CFG, num_samples=8, optim=OptimConfig(lr=1e-1, weight_decay=0.0, grad_clip=1.0))
    trainer, state = _setup(world, mesh1, cfg=cfg, limit=2)
    vocab = trainer.model.config.vocab_size
    target = np.arange(0, vocab, 2)  # the even ids
    reward = _TokenSetReward(target)
    trainer.scorer = reward

    def sampled(params, seed):
        r = [reward.rewards(trainer.sampler.generate(trainer.prompt_ids, jax.random.key(seed * 100 + k),
                                                     params=params)) for k in range(8)]
        return np.concatenate(r)  # [8 calls x 2 prompts x 8 samples]

    mass0 = _first_token_mass(trainer, state.params["policy"], target)
    r0 = sampled(state.params["policy"], 1)
    state, hist = fit_stage2(trainer, state, progress=False)
    mass1 = _first_token_mass(trainer, state.params["policy"], target)
    r1 = sampled(state.params["policy"], 2)
    se = np.sqrt(r0.var() / len(r0) + r1.var() / len(r1))
    print("first-token mass", mass0, "->", mass1, "; sampled reward", r0.mean(), "->", r1.mean(), "se", se)
    assert len(hist) == cfg.steps and all(np.isfinite(m["loss"]) for m in hist)
    assert (mass1 > mass0 + 0.2).all(), (mass0, mass1)
    assert r1.mean() - r0.mean() > max(0.2, 8 * se), (r0.mean(), r1.mean(), se)


def test_grpo_repeats_with_the_same_seed(world, mesh1):
    # the real rollout -> Rechead reward -> update loop, twice from the same seed: the same metrics
    cfg = dataclasses.replace(CFG, steps=3, num_samples=8)
    trainer, state = _setup(world, mesh1, cfg=cfg, limit=2)
    _, hist = fit_stage2(trainer, state, progress=False)
    assert hist[-1]["completion_length"] <= cfg.max_new_tokens and hist[0]["grad_norm"] > 0
    for key in ("reward/len", "reward/ndcg", "reward/format", "kl", "clip_frac_low", "entropy", "time/rollout",
                "time/reward", "time/update", "advantage_std"):
        assert key in hist[0], key
    again, state2 = _setup(world, mesh1, cfg=cfg, limit=2)
    _, hist2 = fit_stage2(again, state2, progress=False)
    assert [_comparable(m) for m in hist] == [_comparable(m) for m in hist2]


def _rollout_batch(trainer, state, step=0):
    """Returns (rewards, update batch) of one rollout, the pieces `GRPOTrainer.step` chains."""
    g = trainer.cfg.num_samples
    idx, out = trainer.rollout(state, step)
    recs = [trainer.records[i] for i in idx for _ in range(g)]
    scored = trainer.scorer.score(state.params, [trainer.prompt_texts[i] for i in idx for _ in range(g)],
                                  [trainer.prompt_ids[i] for i in idx for _ in range(g)], out, recs)
    adv = np.asarray(group_advantages(scored.rewards, g, trainer.cfg.advantage, trainer.cfg.advantage_eps))
    return scored.rewards, trainer.update_batch(out, adv)


# fsdp_tp on (data 2, fsdp 2, tp 2) splits batch, weights and heads over every axis at once, so it covers the dp,
# fsdp and tp strategies' collectives (a separate fsdp 1x8 case cost a minute of CI and found nothing more).
@pytest.mark.parametrize("strategy,mesh_cfg", [("fsdp_tp", shd.MeshConfig(data=2, fsdp=2, tp=2))])
def test_step_under_sharding_equals_one_device(world, mesh1, strategy, mesh_cfg):
    one, s_one = _setup(world, mesh1)
    many, s_many = _setup(world, shd.make_mesh(mesh_cfg), strategy)
    r_one, batch = _rollout_batch(one, s_one)
    r_many, _ = _rollout_batch(many, s_many)
    np.testing.assert_allclose(r_many, r_one, atol=1e-5)  # same completions and rewards on 8 devices
    # The update is compared on one batch: group normalisation divides by std + 1e-4, which would turn the
    # 1e-6 entropy noise of a different reduction order into 1e-4 advantage differences.
    s_one, m_one = make_update_step(one.model, one.cfg, s_one, one.mesh)(s_one, batch)
    s_many, m_many = make_update_step(many.model, many.cfg, s_many, many.mesh)(s_many, batch)
    for k in ("loss", "pg_loss", "kl", "grad_norm", "entropy_mask_frac"):
        assert float(m_many[k]) == pytest.approx(float(m_one[k]), abs=1e-5, rel=1e-5), k
    # (params are not compared: Adam's first step is ~lr * sign(g), which turns 1e-9 gradient noise on
    # near-zero gradients into lr-sized differences; the gradient norm above is the sharding check)
    _, m_next = make_update_step(many.model, many.cfg, s_many, many.mesh)(s_many, batch)
    assert float(m_next["kl"]) > 0  # the policy moved away from the reference


def test_micro_batches_give_the_same_update(world, mesh1):
    trainer, state = _setup(world, mesh1)
    state, m1, _ = trainer.step(state, 0)
    split, state2 = _setup(world, mesh1, cfg=dataclasses.replace(CFG, micro_batches=4))
    state2, m4, _ = split.step(state2, 0)
    for k in ("loss", "pg_loss", "kl", "grad_norm", "entropy_mask_frac"):
        assert m4[k] == pytest.approx(m1[k], abs=1e-6), k
    # (gradient-level exactness of the accumulation is tested in test_grpo_loss.py; params differ only
    # where Adam's ~sign(g) first step meets near-zero gradients)


def test_rechead_refresh_trains_the_reward_model(world, mesh1):
    cfg = dataclasses.replace(CFG, refresh_every=1, refresh_steps=2, refresh_lr=1e-2)
    trainer, state = _setup(world, mesh1, cfg=cfg)
    before = jax.device_get(state.params["rechead"])
    reference = jax.device_get(state.params["reference"])
    state, metrics, _ = trainer.step(state, 0)
    assert np.isfinite(metrics["refresh/loss"])
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                     jax.tree_util.tree_leaves(jax.device_get(state.params["rechead"])))]
    assert any(changed)
    for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(state.params["reference"])):
        np.testing.assert_array_equal(a, np.asarray(b))  # the reference never moves
    state, metrics, _ = trainer.step(state, 1)  # buffers survive donation of both states
    assert np.isfinite(metrics["loss"])


def test_default_reward_runs_the_summariser(world, mesh1):
    cfg = dataclasses.replace(CFG, reward=RewardConfig(summary_max_tokens=8), steps=1)
    trainer, state = _setup(world, mesh1, cfg=cfg)
    assert trainer.scorer.needs_summary and trainer.scorer.needs_cot_mask
    state, metrics, samples = trainer.step(state, 0)
    for k in ("reward/comp", "reward/sim", "reward/ent", "reward/total"):
        assert np.isfinite(metrics[k])
    assert len(samples) == 2 and set(samples[0]) >= {"completion", "reward", "terms", "advantage"}


def test_hidden_state_rechead_reward(world, mesh1):
    head = RecheadConfig(variant="hidden_state", dim=16, input_dim=32)
    params = init_rechead(head, jax.random.key(0), {"hidden": np.zeros((2, 32), np.float32)})
    items = np.random.default_rng(0).normal(size=(world["ds"].num_items + 1, 32)).astype(np.float32)
    cfg = dataclasses.replace(CFG, steps=1)
    trainer, state = _setup(world, mesh1, cfg=cfg, head=head, head_params=params, items=items)
    state, metrics, _ = trainer.step(state, 0)
    assert 0 < metrics["reward/ndcg"] <= 1 and np.isfinite(metrics["loss"])


def test_prompt_offset_takes_the_instances_after_stage1s(world, mesh1):
    first9, _ = _setup(world, mesh1, limit=9)
    offset, _ = _setup(world, mesh1, cfg=dataclasses.replace(CFG, prompt_offset=5), limit=4)
    assert offset.prompt_texts == first9.prompt_texts[5:9] and offset.prompt_ids == first9.prompt_ids[5:9]
    assert len(set(offset.prompt_texts)) > 1 and offset.prompt_texts != first9.prompt_texts[:4]
    with pytest.raises(ValueError, match="prompt_offset=-1"):
        dataclasses.replace(CFG, prompt_offset=-1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        _setup(world, mesh1, cfg=dataclasses.replace(CFG, prompt_offset=10**6), limit=4)


def test_forced_format_rollouts_parse_and_train(world, mesh1):
    # budget forcing in the rollouts: every completion has the format (the format reward term is 1), the forced
    # tokens reach the update as context, and the update runs
    cfg = dataclasses.replace(CFG, steps=1, max_new_tokens=16, force_format=ForceFormat(True, 6, 4))
    trainer, state = _setup(world, mesh1, cfg=cfg, limit=2, whole_tags=True)
    _, out = trainer.rollout(state, 0)
    assert out.forced.any(axis=1).all() and (out.prompt_tokens[:, -1] == trainer.sampler.forcing.think_open).all()
    assert trainer.update_batch(out, np.zeros(len(out.texts)))["forced"].any()
    state, metrics, samples = trainer.step(state, 0)
    assert metrics["reward/format"] == 1.0 and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert "</think>" in samples[0]["completion"] and samples[0]["completion"].rstrip().endswith("</answer>")
