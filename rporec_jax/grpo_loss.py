"""GRPO policy loss: chunked completion log-probs, group advantages, clipped surrogate + KL, grad accumulation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_scale")
ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")


# --------------------------------------------------------------------------------------------------------------
# Per-token log-probs of completions, from hidden states in sequence chunks
# --------------------------------------------------------------------------------------------------------------

def completion_logprobs(model, params, prompt_tokens, prompt_mask, tokens, mask, temperature: float,
                        chunk_size: int = 128, return_entropy: bool = False):
    """Returns log-probs `[rows, new]` (and entropies `[rows, new]`) of completion `tokens` under logits/T.

    prompt_tokens/prompt_mask `[rows, prompt]` (left-padded), tokens/mask `[rows, new]`. Entries outside
    `mask` are 0. Logits exist only `[rows, chunk_size, vocab]` at a time, forward and backward.
    """
    if not temperature > 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"completion_logprobs: chunk_size must be >= 1, got {chunk_size}")
    r, p = prompt_tokens.shape
    n = tokens.shape[1]
    if tokens.shape != (r, n) or mask.shape != (r, n) or prompt_mask.shape != (r, p):
        raise ValueError(f"completion_logprobs: shapes prompt {prompt_tokens.shape}/{prompt_mask.shape}, "
                         f"completion {tokens.shape}/{mask.shape} do not agree on [rows, len]")
    mask = mask.astype(bool)
    seq = jnp.concatenate([prompt_tokens, tokens], axis=1).astype(jnp.int32)
    seq_mask = jnp.concatenate([prompt_mask.astype(bool), mask], axis=1)
    hidden = model.forward(params, seq, mask=seq_mask, compute_logits=False).hidden  # [R, P+N, E]
    # position t predicts token t+1: completion token j (at P+j) is predicted by hidden P+j-1; the prompt is
    # left-padded so position P-1 is always the prompt's last real token.
    hidden = hidden[:, p - 1:p + n - 1]  # [R, N, E]

    c = min(chunk_size, n)
    num_chunks = -(-n // c)
    pad = num_chunks * c - n
    h = jnp.pad(hidden, [(0, 0), (0, pad), (0, 0)])
    t = jnp.pad(tokens.astype(jnp.int32), [(0, 0), (0, pad)])
    h = h.reshape(r, num_chunks, c, -1).swapaxes(0, 1)  # [chunks, R, C, E]
    t = t.reshape(r, num_chunks, c).swapaxes(0, 1)  # [chunks, R, C]

    # remat: without it the backward pass would keep every chunk's softmax, i.e. the full logits again
    @jax.checkpoint
    def one_chunk(args):
        h_c, t_c = args
        logits = model.unembed(params, h_c).astype(jnp.float32) / temperature  # [R, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        logp = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0] - lse
        if not return_entropy:
            return logp, jnp.zeros_like(logp)
        probs = jnp.exp(logits - lse[..., None])
        return logp, lse - jnp.sum(probs * logits, axis=-1)

    logp, ent = jax.lax.map(one_chunk, (h, t))  # [chunks, R, C]
    unchunk = lambda x: x.swapaxes(0, 1).reshape(r, num_chunks * c)[:, :n]  # noqa: E731
    logp = jnp.where(mask, unchunk(logp), 0.0)
    if not return_entropy:
        return logp
    return logp, jnp.where(mask, unchunk(ent), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------------

def check_advantage_args(rows: int, num_samples: int, mode: str) -> None:
    """Raises ValueError unless `rows` rewards split into groups of `num_samples` under `mode`. Touches no
    device (configs call it before a multi-host run has initialised JAX)."""
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"group_advantages: mode {mode!r} not in {ADVANTAGE_MODES}")
    if num_samples < 1 or rows % num_samples:
        raise ValueError(f"group_advantages: {rows} rewards do not split into groups of num_samples={num_samples}")
    if mode == "rloo" and num_samples < 2:
        raise ValueError("group_advantages: rloo needs num_samples >= 2 (a leave-one-out mean)")


def group_advantages(rewards, num_samples: int, mode: str = "grpo", eps: float = 1e-4, ddof: int = 0):
    """Returns advantages `[rows]` for rewards `[rows]` in prompt-major groups of `num_samples` (row // G)."""
    g = int(num_samples)
    (r,) = rewards.shape
    check_advantage_args(r, g, mode)
    x = rewards.astype(jnp.float32).reshape(r // g, g)
    mean = x.mean(axis=1, keepdims=True)
    if mode == "grpo":
        adv = (x - mean) / (jnp.std(x, axis=1, keepdims=True, ddof=ddof) + eps)
    elif mode == "drgrpo":
        adv = x - mean
    else:
        adv = x - (x.sum(axis=1, keepdims=True) - x) / (g - 1)
    return adv.reshape(r)


# --------------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
    """GRPO policy-loss settings (defaults: the reference's clip 0.2, k3 KL with beta 0.001, top-20% entropy)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.001
    kl_estimator: str = "k3"
    max_log_ratio: float = 20.0  # exp(20) ~ 5e8: finite in fp32, and the clip makes larger ratios moot
    entropy_quantile: Optional[float] = 0.2  # fraction of highest-entropy tokens given the PG term; None = all
    aggregation: str = "seq_mean_token_mean"
    max_completion_len: Optional[int] = None  # seq_mean_token_scale divisor; None = the batch's width N

    def __post_init__(self):
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"GRPOLossConfig.kl_estimator: {self.kl_estimator!r} not in {KL_ESTIMATORS}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"GRPOLossConfig.aggregation: {self.aggregation!r} not in {AGGREGATIONS}")
        if self.entropy_quantile is not None and not 0 < self.entropy_quantile <= 1:
            raise ValueError(f"GRPOLossConfig.entropy_quantile: expected in (0, 1] or None, "
                             f"got {self.entropy_quantile}")
        if self.eps_low < 0 or self.eps_high < 0 or self.beta < 0 or self.max_log_ratio <= 0:
            raise ValueError(f"GRPOLossConfig: eps_low/eps_high/beta must be >= 0 and max_log_ratio > 0: {self}")


class GRPONorm(NamedTuple):
    """Whole-batch quantities a micro-batch's loss needs to be an exact share of the full-batch loss."""

    num_sequences: jax.Array  # scalar: rows in the full batch
    num_tokens: jax.Array  # scalar: valid completion tokens in the full batch
    entropy_threshold: jax.Array  # scalar: entropy quantile over the full batch's valid tokens (nan = none)


def action_mask(mask, forced=None):
    """Returns bool `[rows, new]`: the completion tokens (`mask`) the policy chose, i.e. not written by budget
    forcing (`forced`, None = none). Forced tokens stay in the sequence the log-probs condition on; the
    policy-gradient, KL and entropy terms (`grpo_norm`, `grpo_loss` given this mask) leave them out."""
    mask = mask.astype(bool)
    return mask if forced is None else mask & ~forced.astype(bool)


def kl_per_token(logp, ref_logp, estimator: str = "k3"):
    """Returns the per-token KL(policy || reference) estimate `[...]` for log-probs `[...]`."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"kl_per_token: estimator {estimator!r} not in {KL_ESTIMATORS}")


def entropy_threshold(entropies, mask, quantile: Optional[float]):
    """Returns the scalar entropy above which a valid token is in the top `quantile` (nan if no tokens)."""
    if quantile is None:
        return jnp.asarray(-jnp.inf, jnp.float32)
    ent = jnp.where(mask.astype(bool), jax.lax.stop_gradient(entropies).astype(jnp.float32), jnp.nan)
    # linear interpolation, as torch.quantile in the reference (TRL get_high_entropy_mask)
    return jnp.nanquantile(ent.reshape(-1), 1.0 - quantile)


def grpo_norm(mask, entropies, cfg: GRPOLossConfig) -> GRPONorm:
    """Returns the GRPONorm of a full batch (mask/entropies `[rows, new]`), for micro-batched losses."""
    if cfg.entropy_quantile is not None and entropies is None:
        raise ValueError("grpo_norm: cfg.entropy_quantile is set but no entropies were given")
    mask = mask.astype(bool)
    thr = entropy_threshold(entropies, mask, cfg.entropy_quantile) if entropies is not None else jnp.asarray(
        -jnp.inf, jnp.float32)
    return GRPONorm(jnp.asarray(mask.shape[0], jnp.float32), mask.sum().astype(jnp.float32), thr)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, entropies, cfg: GRPOLossConfig,
              norm: Optional[GRPONorm] = None):
    """Returns (scalar loss, metrics dict) for log-probs `[rows, new]`, advantages `[rows]`, mask `[rows, new]`
    (the tokens that are actions: `action_mask` of the completion mask and the forced tokens).

    old_logp/ref_logp (None: no KL) / entropies (None only if cfg.entropy_quantile is None) are `[rows, new]`
    and not differentiated. `norm` (from `grpo_norm` on the full batch) makes a micro-batch's loss its exact
    share of the full-batch loss, so micro-batch gradients sum to the full-batch gradient.
    """
    r, n = logp.shape
    if old_logp.shape != (r, n) or mask.shape != (r, n) or advantages.shape != (r,):
        raise ValueError(f"grpo_loss: logp {logp.shape}, old_logp {old_logp.shape}, mask {mask.shape}, "
                         f"advantages {advantages.shape}: expected [rows, new] x3 and [rows]")
    if ref_logp is not None and ref_logp.shape != (r, n):
        raise ValueError(f"grpo_loss: ref_logp {ref_logp.shape} is not [rows, new] = {(r, n)}")
    if cfg.beta > 0 and ref_logp is None:
        raise ValueError(f"grpo_loss: cfg.beta={cfg.beta} > 0 needs ref_logp")
    norm = grpo_norm(mask, entropies, cfg) if norm is None else norm
    sg = jax.lax.stop_gradient
    mask = mask.astype(bool)
    maskf = mask.astype(jnp.float32)
    logp = logp.astype(jnp.float32)
    old_logp = sg(old_logp.astype(jnp.float32))
    adv = sg(advantages.astype(jnp.float32))[:, None]

    # padding entries may hold anything; zeroing them keeps exp()/grads finite there
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    log_ratio = jnp.clip(log_ratio, -cfg.max_log_ratio, cfg.max_log_ratio)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)  # [R, N]

    if cfg.entropy_quantile is not None:
        if entropies is None:
            raise ValueError("grpo_loss: cfg.entropy_quantile is set but no entropies were given")
        # a selection, not a function of the policy to optimise: never differentiated
        ent_mask = sg(entropies.astype(jnp.float32) >= norm.entropy_threshold) & mask
    else:
        ent_mask = mask
    per_token = pg * ent_mask.astype(jnp.float32)

    if ref_logp is not None:
        ref = sg(ref_logp.astype(jnp.float32))
        kl = kl_per_token(logp, jnp.where(mask, ref, logp), cfg.kl_estimator)  # [R, N], 0 off the mask
    else:
        kl = jnp.zeros_like(logp)
    if cfg.beta > 0:
        per_token = per_token + cfg.beta * kl

    agg = lambda x: _aggregate(x, maskf, norm, cfg)  # noqa: E731
    loss = agg(per_token)
    n_tok = jnp.maximum(norm.num_tokens, 1.0)
    token_frac = lambda x: jnp.sum(x.astype(jnp.float32) * maskf) / n_tok  # noqa: E731
    metrics = {
        "pg_loss": agg(pg * ent_mask.astype(jnp.float32)),
        "kl": agg(kl),
        "clip_frac_low": token_frac((ratio < 1.0 - cfg.eps_low) & (adv < 0)),
        "clip_frac_high": token_frac((ratio > 1.0 + cfg.eps_high) & (adv > 0)),
        "ratio_mean": token_frac(ratio),
        "entropy_mask_frac": token_frac(ent_mask),
    }
    return loss, metrics


def _aggregate(x, maskf, norm: GRPONorm, cfg: GRPOLossConfig):
    """Returns the scalar aggregate of per-token values `[rows, new]` under cfg.aggregation."""
    masked = x * maskf
    if cfg.aggregation == "token_mean":
        return masked.sum() / jnp.maximum(norm.num_tokens, 1.0)
    if cfg.aggregation == "seq_mean_token_mean":
        per_seq = masked.sum(axis=1) / jnp.maximum(maskf.sum(axis=1), 1.0)
        return per_seq.sum() / norm.num_sequences
    width = cfg.max_completion_len or x.shape[1]  # Dr.GRPO: a constant divisor, no length bias
    return masked.sum() / (width * norm.num_sequences)


# --------------------------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------------------------

def split_micro_batches(batch, num_micro: int, sharding=None):
    """Returns `batch` (a pytree of `[rows, ...]` arrays) as `[num_micro, rows / num_micro, ...]`, strided:
    micro-batch m holds rows m, m + num_micro, ... so that, with rows split over devices in contiguous blocks,
    every micro-batch spans every device (MaxText's strided accumulation). `sharding(ndim)` (optional) returns
    the sharding a micro-batched array is constrained to (rows of each micro-batch over the batch axes)."""
    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"split_micro_batches: {x.shape[0]} rows do not split into {num_micro} micro-batches")
        x = jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding(x.ndim))
    return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]], params, micro_batches,
                         grad_shardings=None):
    """Returns (summed loss, summed grads, per-micro-batch aux stacked `[num_micro, ...]`).

    `loss_fn(params, micro_batch) -> (loss, aux)` must return each micro-batch's share of the full-batch
    loss (e.g. `grpo_loss(..., norm=grpo_norm(full_mask, full_entropies, cfg))`), so the sums are exact.
    `micro_batches` is a pytree with a leading micro-batch axis; a scan keeps one micro-batch live at a time.
    `grad_shardings` (a pytree like `params`) pins the accumulator to the parameters' shardings, so under fsdp
    each device keeps only its shard of the running sum.
    """
    pin = (lambda t: t) if grad_shardings is None else \
        (lambda t: jax.lax.with_sharding_constraint(t, grad_shardings))  # noqa: E731
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, mb):
        loss_acc, grad_acc = carry
        (loss, aux), grads = grad_fn(params, mb)
        grad_acc = pin(jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), grad_acc, grads))
        return (loss_acc + loss, grad_acc), aux

    zeros = pin(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss, grads), aux = jax.lax.scan(step, (jnp.zeros((), jnp.float32), zeros), micro_batches)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, grads, aux
