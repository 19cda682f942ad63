"""Stage 2: GRPO refinement of the backbone's reasoning, rewarded by the frozen Rechead's ranking of the target.

    state = stage2_state(stage1_state, model.params, cfg.optim)
    trainer = GRPOTrainer(model, head, encoder, ds, cfg, mesh)
    for step in range(cfg.steps):
        state, metrics, samples = trainer.step(state, step)

One step: rollout (G samples per prompt, sampler) -> parse -> Rechead scores -> rewards -> group advantages ->
one jitted, sharded policy update (chunked log-probs, clipped surrogate + KL to the reference, exact micro-batch
gradient accumulation). The data order and every random key are functions of (seed, step), so a run resumed at
step k repeats exactly what an uninterrupted run does from k.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rporec_jax import sharding as shd
from rporec_jax.grpo_loss import GRPOLossConfig, accumulate_gradients, action_mask, check_advantage_args, \
    completion_logprobs, group_advantages, grpo_loss, grpo_norm, split_micro_batches
from rporec_jax.rewards import RewardConfig
from rporec_jax.sampling import ForceFormat, Sampler, SamplingConfig
from rporec_jax.train.state import OptimConfig, TrainState, add_params, attach_optimizer, compose, set_trainable, \
    snapshot

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stage2Config:
    """GRPO settings (reference: G 4, T 1.0, <= 1024 new tokens, lr 1e-6, beta 0.001 k3, clip 0.2, top-20%
    entropy tokens, `(r - mean) / (std + 1e-4)` advantages, one update per batch).

    batch_size: prompts per step (rows = batch_size * num_samples). micro_batches: the update's gradient
    accumulation splits (rows must divide into them, and each micro-batch over the mesh's batch axes).
    use_rollout_logprobs: ratio against the sampler's log-probs; False (TRL's choice with one update per
    batch) uses the update's own detached log-probs, so the ratio is exactly 1.
    refresh_every: every N steps, train the Rechead on that step's rollouts for `refresh_steps` stage-1 steps
    (0 = frozen Rechead, the reference). length_bucket: completions are trimmed to a multiple of it before the
    update (fewer wasted tokens, a bounded number of compiled shapes).
    prompt_offset: GRPO prompts are train instances [prompt_offset, prompt_offset + limit); set it to stage 1's
    train limit so the frozen Rechead rewards users it did not fit (0, the reference, reuses them).
    force_format: budget forcing of the rollouts' answer format (`rporec_jax.sampling.ForceFormat`; needs
    assume_think_open); the tokens it writes are in the sequence the policy conditions on but are not its
    actions, so the loss leaves them out. Policy evaluation uses it too.
    """

    steps: int = 100
    batch_size: int = 2
    num_samples: int = 4
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    assume_think_open: bool = False
    force_format: ForceFormat = ForceFormat()
    loss: GRPOLossConfig = GRPOLossConfig()
    reward: RewardConfig = RewardConfig()
    advantage: str = "grpo"
    advantage_eps: float = 1e-4
    advantage_ddof: int = 0
    optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0)
    micro_batches: int = 1
    logprob_chunk: int = 128
    length_bucket: int = 64
    use_rollout_logprobs: bool = False
    reference_dtype: str = ""  # '' = the policy's dtype; e.g. 'bfloat16' halves the reference's memory
    refresh_every: int = 0
    refresh_steps: int = 1
    refresh_lr: float = 1e-4
    prompt_offset: int = 0
    log_samples: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.num_samples < 1 or self.micro_batches < 1:
            raise ValueError(f"Stage2Config: steps={self.steps} (>= 0), batch_size={self.batch_size}, "
                             f"num_samples={self.num_samples}, micro_batches={self.micro_batches} (>= 1)")
        if (self.batch_size * self.num_samples) % self.micro_batches:
            raise ValueError(f"Stage2Config.micro_batches={self.micro_batches} does not divide the "
                             f"{self.batch_size * self.num_samples} rows (batch_size x num_samples)")
        if self.num_samples < 2:
            raise ValueError("Stage2Config.num_samples must be >= 2: group advantages need several samples")
        if not self.temperature > 0:
            raise ValueError(f"Stage2Config.temperature={self.temperature}; GRPO rollouts must sample (> 0)")
        if (self.length_bucket < 1 or self.logprob_chunk < 1 or self.refresh_every < 0 or self.refresh_steps < 1
                or self.prompt_offset < 0):
            raise ValueError(f"Stage2Config: length_bucket={self.length_bucket}, logprob_chunk="
                             f"{self.logprob_chunk}, refresh_steps={self.refresh_steps} must be >= 1 and "
                             f"refresh_every={self.refresh_every}, prompt_offset={self.prompt_offset} >= 0")
        check_advantage_args(self.num_samples, self.num_samples, self.advantage)
        self.sampling()

    def sampling(self) -> SamplingConfig:
        """Returns the rollout sampler's settings (entropies on: the loss's token mask and R_ent need them)."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, num_samples=self.num_samples, prompt_buckets=self.prompt_buckets,
                              return_entropies=True, force=self.force_format)


# --------------------------------------------------------------------------------------------------------------
# State transition
# --------------------------------------------------------------------------------------------------------------

def stage2_transition(policy_params: Any, optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.0),
                      reference_dtype: Optional[Any] = None):
    """Returns the transform stage-1 state -> stage-2 state: add the backbone as `policy` (the only trainable
    subtree; the Rechead and item matrix become frozen), snapshot it as the frozen `reference` (KL anchor and
    summariser; optionally held in `reference_dtype`, e.g. bfloat16) and attach the stage-2 optimizer."""
    return compose(add_params("policy", policy_params), set_trainable("policy"),
                   snapshot("policy", "reference", reference_dtype), attach_optimizer(optim.make()))


def stage2_state(stage1: TrainState, policy_params: Any, optim: OptimConfig = OptimConfig(lr=1e-6, weight_decay=0.0),
                 reference_dtype: Optional[Any] = None) -> TrainState:
    """Returns the stage-2 TrainState built from a trained stage-1 state and the backbone's params.

    The stage-2 step donates its state, so the Rechead and item arrays are copied here: the stage-1 state
    stays usable afterwards."""
    copied = jax.tree_util.tree_map(jnp.copy, {k: stage1.params[k] for k in ("rechead", "items")})
    meshes = {x.sharding.mesh for x in jax.tree_util.tree_leaves(policy_params)
              if isinstance(getattr(x, "sharding", None), NamedSharding)}
    base = TrainState.create(copied, jnp.copy(stage1.key), meshes.pop() if len(meshes) == 1 else None)
    return stage2_transition(policy_params, optim, reference_dtype or None)(base)


# --------------------------------------------------------------------------------------------------------------
# The policy update: a pure, jitted function of (state, rollout batch)
# --------------------------------------------------------------------------------------------------------------

UPDATE_KEYS = ("prompt_tokens", "prompt_mask", "tokens", "mask", "forced", "advantages", "entropies", "old_logp")


def policy_update(model, cfg: Stage2Config, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """Returns (state after one GRPO update, metrics) for a rollout batch of R rows.

    batch: prompt_tokens/prompt_mask `[R, P]`, tokens/mask/entropies `[R, N]`, advantages `[R]`, optionally
    forced `[R, N]` (budget forcing's tokens: conditioned on, never actions), and old_logp `[R, N]` when
    cfg.use_rollout_logprobs. Pure: jit it with the state's shardings. With a mesh on `model`, every micro-batch
    is split over all batch devices and the gradient sum keeps the policy's shardings.
    """
    train, frozen = state.split_params()
    lcfg = cfg.loss
    actions = action_mask(batch["mask"], batch.get("forced"))
    norm = grpo_norm(actions, batch["entropies"], lcfg)  # whole-batch quantities: exact micro-batching
    rows_sharding = grad_shardings = None
    if model.mesh is not None and cfg.micro_batches > 1:
        mesh = model.mesh
        rows_sharding = lambda nd: NamedSharding(mesh, P(None, shd.BATCH_AXES, *([None] * (nd - 2))))  # noqa: E731
        grad_shardings = {"policy": model.param_shardings()}
    micro = split_micro_batches({**batch, "actions": actions}, cfg.micro_batches, rows_sharding)

    def logprobs(params, mb):  # over the whole completion mask: forced tokens are context for what follows
        return completion_logprobs(model, params, mb["prompt_tokens"], mb["prompt_mask"], mb["tokens"], mb["mask"],
                                   cfg.temperature, cfg.logprob_chunk)

    def loss_fn(tr, mb):
        logp = logprobs(tr["policy"], mb)
        old = mb["old_logp"] if cfg.use_rollout_logprobs else jax.lax.stop_gradient(logp)
        ref = jax.lax.stop_gradient(logprobs(frozen["reference"], mb)) if lcfg.beta > 0 else None
        return grpo_loss(logp, old, ref, mb["advantages"], mb["actions"], mb["entropies"], lcfg, norm)

    loss, grads, aux = accumulate_gradients(loss_fn, train, micro, grad_shardings)
    state, gnorm = state.apply_gradients(grads)
    # every aux metric is already normalised by whole-batch counts, so micro-batch values add up
    metrics = {k: jnp.sum(v) for k, v in aux.items()}
    return state, {**metrics, "loss": loss, "grad_norm": gnorm}


def make_update_step(model, cfg: Stage2Config, state: TrainState, mesh: Optional[Mesh] = None):
    """Returns `run(state, batch) -> (state, metrics)`: `policy_update` jitted with explicit shardings (state
    kept in place and donated, rows split over ('data', 'fsdp')), one program per batch shape."""
    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    compiled = {}

    def run(state: TrainState, batch: dict):
        batch = {k: v for k, v in batch.items() if k in UPDATE_KEYS and v is not None}
        sig = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if sig not in compiled:
            shardings = {k: NamedSharding(mesh, P(shd.BATCH_AXES, *([None] * (np.ndim(v) - 1))))
                         for k, v in batch.items()}
            compiled[sig] = jax.jit(lambda s, b: policy_update(model, cfg, s, b),
                                    in_shardings=(state_shardings, shardings),
                                    out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)
        return compiled[sig](state, shd.host_batch_to_global(batch, mesh))

    return run


# --------------------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------------------

def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Returns the example indices `[batch_size]` of `step`: epochs are seeded permutations, read in order, so
    the order is a pure function of (seed, step) and a resumed run needs no iterator state."""
    if num_examples < 1:
        raise ValueError("stage 2 has no training prompts")
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, num_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
        take = min(batch_size - len(out), num_examples - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return np.asarray(out, np.int64)


def rollout_key(seed: int, step: int) -> jax.Array:
    """Returns the rollout sampling key of `step`."""
    return jax.random.fold_in(jax.random.key(seed), step)


# --------------------------------------------------------------------------------------------------------------
# The trainer: rollout -> rewards -> update, plus the optional Rechead refresh
# --------------------------------------------------------------------------------------------------------------

class GRPOTrainer:
    """Runs GRPO steps on a stage-2 TrainState; holds only built programs and the dataset's prompts.

    model: the policy `Model` (its params' placement is the policy's). head/encoder: the Rechead config and its
    text encoder (the frozen E_item tower, also used for R_sim). ds: a PreparedDataset; prompts come from its
    `train` split (`limit` instances from `cfg.prompt_offset` when given).
    """

    def __init__(self, model, head, encoder, ds, cfg: Stage2Config, mesh: Optional[Mesh] = None,
                 limit: Optional[int] = None):
        from rporec_jax.train.rollout_scoring import RolloutScorer

        self.model, self.head, self.encoder, self.ds, self.cfg = model, head, encoder, ds, cfg
        self.mesh = mesh or model.mesh or shd.make_mesh(devices=jax.devices()[:1])
        multiple = int(np.prod([self.mesh.shape[a] for a in shd.BATCH_AXES]))
        rows = cfg.batch_size * cfg.num_samples
        if (rows // cfg.micro_batches) % multiple:
            raise ValueError(f"stage 2: {rows} rows / {cfg.micro_batches} micro-batches = "
                             f"{rows // cfg.micro_batches} rows per update, not divisible by the mesh's batch "
                             f"size {multiple}; change batch_size, num_samples or micro_batches")
        end = None if limit is None else cfg.prompt_offset + limit
        self.records = list(itertools.islice(ds.records("train"), cfg.prompt_offset, end))
        if len(self.records) < cfg.batch_size:
            raise ValueError(f"stage 2: {len(self.records)} train instances from prompt_offset "
                             f"{cfg.prompt_offset} (limit {limit}), fewer than batch_size {cfg.batch_size}")
        builder = ds.prompt_builder(model.tokenizer)
        hists = [[h for h in r["history"] if h] for r in self.records]
        self.prompt_ids = [ids for ids, _ in builder.encode(hists)]
        self.prompt_texts = [builder.user_content(h) for h in hists]
        self.sampler = Sampler(model, cfg.sampling())
        self.scorer = RolloutScorer(model, head, encoder, ds.num_items, cfg.reward, self.mesh,
                                    cfg.assume_think_open)
        self._update = None
        self.refresh_state: Optional[TrainState] = None
        self._refresh_step = None

    def rollout(self, state: TrainState, step: int):
        """Returns (record indices [B], SampleOutput of B * G rows) of `step` under the current policy."""
        idx = batch_indices(len(self.records), self.cfg.batch_size, step, self.cfg.seed)
        out = self.sampler.generate([self.prompt_ids[i] for i in idx], rollout_key(self.cfg.seed, step),
                                    params=state.params["policy"])
        return idx, out

    def update_batch(self, out, advantages: np.ndarray) -> dict:
        """Returns the update's inputs from a rollout, completions trimmed to a multiple of length_bucket."""
        cfg = self.cfg
        width = max(1, int(out.lengths.max()))
        width = min(out.tokens.shape[1], -(-width // cfg.length_bucket) * cfg.length_bucket)
        return {"prompt_tokens": out.prompt_tokens, "prompt_mask": out.prompt_mask,
                "tokens": out.tokens[:, :width], "mask": out.mask[:, :width], "forced": out.forced[:, :width],
                "entropies": out.entropies[:, :width].astype(np.float32),
                "old_logp": out.logprobs[:, :width].astype(np.float32) if cfg.use_rollout_logprobs else None,
                "advantages": advantages.astype(np.float32)}

    def step(self, state: TrainState, step: int) -> tuple[TrainState, dict, list[dict]]:
        """Returns (state after GRPO step `step`, metrics, logged sample rows)."""
        cfg = self.cfg
        g = cfg.num_samples
        t0 = time.perf_counter()
        idx, out = self.rollout(state, step)
        t1 = time.perf_counter()
        recs = [self.records[i] for i in idx for _ in range(g)]
        scored = self.scorer.score(state.params, [self.prompt_texts[i] for i in idx for _ in range(g)],
                                   [self.prompt_ids[i] for i in idx for _ in range(g)], out, recs)
        rewards = scored.rewards
        adv = np.asarray(group_advantages(jnp.asarray(rewards), g, cfg.advantage, cfg.advantage_eps,
                                          cfg.advantage_ddof))
        t2 = time.perf_counter()
        if self._update is None:
            self._update = make_update_step(self.model, cfg, state, self.mesh)
        state, upd = self._update(state, self.update_batch(out, adv))
        upd = {k: float(v) for k, v in shd.to_host(upd).items()}
        t3 = time.perf_counter()
        metrics = {**scored.metrics, **upd}
        if cfg.refresh_every and (step + 1) % cfg.refresh_every == 0:
            state, refresh = self.refresh(state, scored.examples)
            metrics.update(refresh)
        t4 = time.perf_counter()
        mask, sampled = out.mask, out.mask & ~out.forced  # forced tokens have no entropy of their own
        grouped = rewards.reshape(-1, g)
        metrics.update({
            "completion_length": float(out.lengths.mean()),
            "completion_stopped": float(out.stopped.mean()),
            "entropy": float((out.entropies * sampled).sum() / max(sampled.sum(), 1)),
            "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
            "advantage_abs_mean": float(np.abs(adv).mean()),
            "zero_std_groups": float((grouped.std(axis=1) == 0).mean()),
            "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2, "time/refresh": t4 - t3,
            "time/step": t4 - t0, "tokens": int(mask.sum()),
        })
        samples = [{"index": int(recs[r]["index"]), "sample": r % g, "completion": out.texts[r],
                    "reward": float(rewards[r]), "advantage": float(adv[r]),
                    "terms": {k: float(v[r]) for k, v in scored.terms.items()}}
                   for r in range(min(cfg.log_samples, len(recs)))]
        return state, metrics, samples

    def init_refresh(self, state: TrainState) -> None:
        """Sets `refresh_state` (the refreshed Rechead's own trainable state: `state`'s Rechead, a fresh
        optimizer) when the config refreshes the Rechead and it is not set yet; checkpoints save it."""
        if not self.cfg.refresh_every or self.refresh_state is not None:
            return
        # copies: the GRPO step donates its state, so the two states must not share buffers
        params = jax.tree_util.tree_map(jnp.copy, {k: state.params[k] for k in ("rechead", "items")})
        self.refresh_state = compose(set_trainable("rechead"), attach_optimizer(
            OptimConfig(lr=self.cfg.refresh_lr, weight_decay=0.0).make()))(
            TrainState.create(params, jax.random.key(self.cfg.seed + 7), self.mesh))

    def refresh(self, state: TrainState, examples: Optional[dict]) -> tuple[TrainState, dict]:
        """Returns (state with the Rechead trained on this step's rollouts, refresh metrics): `refresh_steps`
        stage-1 steps on a separate Rechead optimizer, then the new Rechead swapped into the frozen slot."""
        from rporec_jax.train.stage1 import make_stage1_step

        if examples is None:
            raise ValueError("Rechead refresh needs a text Rechead (text_fusion or prompt_only)")
        self.init_refresh(state)
        if self._refresh_step is None:
            self._refresh_step = make_stage1_step(self.head, self.refresh_state, self.mesh)
        losses = []
        for _ in range(self.cfg.refresh_steps):
            self.refresh_state, m = self._refresh_step(self.refresh_state, examples)
            losses.append(float(m["loss"]))
        new = jax.tree_util.tree_map(jnp.copy, self.refresh_state.params["rechead"])
        return add_params("rechead", new)(state), {"refresh/loss": float(np.mean(losses))}


def fit_stage2(trainer: GRPOTrainer, state: TrainState, start_step: int = 0, on_step=None, should_stop=None,
               progress: bool = True) -> tuple[TrainState, list[dict]]:
    """Returns (state, per-step metrics) after steps `start_step .. cfg.steps - 1`.

    on_step(step, state, metrics, samples) runs after every step (logging, checkpoints); should_stop() is
    checked after every step (preemption: the caller saves and exits).
    """
    from tqdm.auto import tqdm

    history = []
    bar = tqdm(range(start_step, trainer.cfg.steps), desc="stage 2 (GRPO)", unit="step", disable=not progress,
               dynamic_ncols=True, initial=start_step, total=trainer.cfg.steps)
    for step in bar:
        state, metrics, samples = trainer.step(state, step)
        for k in ("loss", "grad_norm"):
            if not np.isfinite(metrics[k]):
                raise FloatingPointError(f"stage 2 step {step}: {k} is {metrics[k]} (rewards "
                                         f"{metrics.get('reward/total')}, kl {metrics.get('kl')}); the last good "
                                         "checkpoint is kept")
        metrics = {"step": step + 1, **metrics}
        history.append(metrics)
        bar.set_postfix(reward=f"{metrics['reward/total']:.3f}", fmt=f"{metrics['reward/format']:.2f}",
                        kl=f"{metrics['kl']:.2g}", refresh=False)
        if on_step is not None:
            on_step(step + 1, state, metrics, samples)
        if should_stop is not None and should_stop():
            break
    bar.close()
    return state, history
