"""Losses: the Rechead's sampled-softmax cross-entropy (stage 1)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def candidate_logits(user: jax.Array, items: jax.Array, target: jax.Array, negatives: jax.Array) -> jax.Array:
    """Returns scores `[batch, 1 + K]` of each user vector `[batch, dim]` against its target (column 0) and
    its K negatives `[batch, K]`, rows of the item matrix `[items + 1, dim]` (no normalisation/temperature)."""
    cand = jnp.concatenate([target[:, None], negatives], axis=1)
    return jnp.einsum("bd,bkd->bk", user, jnp.take(items, cand, axis=0), preferred_element_type=jnp.float32)


def sampled_softmax_ce(user: jax.Array, items: jax.Array, target: jax.Array, negatives: jax.Array,
                       valid: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """Returns (mean cross-entropy of the target among 1 + K candidates over valid rows, metrics)."""
    logits = candidate_logits(user, items, target, negatives)
    per_row = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
    w = jnp.ones_like(per_row) if valid is None else valid.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    loss = jnp.sum(per_row * w) / n
    # the target wins when no negative scores strictly higher (ties count as losses: pessimistic)
    acc = jnp.sum((logits[:, 0] > jnp.max(logits[:, 1:], axis=-1)) * w) / n
    return loss, {"loss": loss, "candidate_acc": acc}
