"""Causal decoder (Llama / Qwen2 / Qwen3 families) as a Flax Linen module, with a KV-cache path.

Parameters carry logical axis names (see `rporec_jax.sharding`); the layer stack is an `nn.scan`, so its
parameters have a leading `layers` axis and a 30-layer model compiles one layer body.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from rporec_jax.models.decoder_config import DecoderConfig

Array = jax.Array
_NEG_INF = -1e30  # finite, so a fully masked (padding) query row softmaxes to uniform instead of NaN


class KVCache(NamedTuple):
    """Keys/values of every layer for a left-padded batch; slot j of every row holds the same time step.

    k, v:   [layers, batch, kv_heads, max_len, head_dim] (slots next to head_dim: attention reads them
            as plain batched matmuls, with no per-layer relayout of the cache)
    valid:  [batch, max_len] bool, True where the slot holds a real (non-padding) token
    index:  [] int32, the next slot to write
    """

    k: Array
    v: Array
    valid: Array
    index: Array

    @property
    def max_len(self) -> int:
        """Returns the number of slots."""
        return self.k.shape[3]

    def next_positions(self) -> Array:
        """Returns `[batch]` RoPE positions for the next token of each row (its count of real tokens)."""
        return jnp.sum(self.valid, axis=-1).astype(jnp.int32)


class DecoderOutput(NamedTuple):
    """logits [batch, seq, vocab] (None when not computed), hidden [batch, seq, embed] after the final norm,
    cache (None without a cache)."""

    logits: Optional[Array]
    hidden: Array
    cache: Optional[KVCache]


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """Returns an empty KVCache sized `[layers, batch, kv_heads, max_len, head_dim]`."""
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    dtype = dtype or config.compute_dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((), jnp.int32))


def positions_from_mask(mask: Array) -> Array:
    """Returns `[batch, seq]` int32 positions counting only real tokens (left padding gets position 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _dense_init(names):
    return nn.with_logical_partitioning(nn.initializers.normal(0.02), names)


def _zeros_init(names):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled by a learned weight (HF Llama semantics)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Returns x `[batch, seq, heads, head_dim]` rotated in HF's half-split layout; cos/sin `[batch, seq, head_dim]`."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def rope_tables(config: DecoderConfig, positions: Array) -> tuple[Array, Array]:
    """Returns float32 cos, sin `[batch, seq, head_dim]` for int positions `[batch, seq]`."""
    inv_freq = jnp.asarray(config.rope_inv_freq(), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def attend(q, k, v, mask, past=None):
    """Returns attention output `[batch, seq, heads, head_dim]` for grouped queries.

    q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads, head_dim] are this call's keys/values with
    mask [batch, seq, seq]; `past` = (k, v [batch, kv_heads, slots, head_dim], mask [batch, 1, slots]) are
    cached ones. Scores against both are softmaxed together, so the cache is read but never copied.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d) * (d ** -0.5)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    if past is not None:
        k_past, v_past, mask_past = past
        past_scores = jnp.einsum("btkgd,bksd->bkgts", q, k_past.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = jnp.concatenate([jnp.where(mask_past[:, None, None], past_scores, _NEG_INF), scores], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    if past is None:
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    else:
        slots = past[0].shape[2]
        out = (jnp.einsum("bkgts,bksd->btkgd", probs[..., :slots], v_past.astype(q.dtype))
               + jnp.einsum("bkgts,bskd->btkgd", probs[..., slots:], v))
    return out.reshape(b, t, h, d)


class Attention(nn.Module):
    """Grouped-query self-attention; returns its output and this call's (k, v) for the cache."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, past):
        c = self.config
        dense = lambda feats, names, bias, name: nn.DenseGeneral(  # noqa: E731
            feats, use_bias=bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype, name=name,
            kernel_init=_dense_init(("embed",) + names), bias_init=_zeros_init(names))
        q = dense((c.num_heads, c.head_dim), ("heads", "head_dim"), c.qkv_bias, "q")(x)
        k = dense((c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), c.qkv_bias, "k")(x)
        v = dense((c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), c.qkv_bias, "v")(x)
        if c.qk_norm:
            norm = lambda name: RMSNorm(c.rms_norm_eps, c.compute_dtype, c.weight_dtype, name=name)  # noqa: E731
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, mask, past)
        out = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), use_bias=c.o_bias, dtype=c.compute_dtype,
                              param_dtype=c.weight_dtype, name="o",
                              kernel_init=_dense_init(("heads", "head_dim", "embed")),
                              bias_init=_zeros_init(("embed",)))(out)
        return out, (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda feats, names, name: nn.Dense(  # noqa: E731
            feats, use_bias=c.mlp_bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype, name=name,
            kernel_init=_dense_init(names), bias_init=_zeros_init(names[-1:]))
        h = nn.silu(dense(c.intermediate_size, ("embed", "mlp"), "gate")(x))
        h = h * dense(c.intermediate_size, ("embed", "mlp"), "up")(x)
        return dense(c.hidden_size, ("mlp", "embed"), "down")(h)


def constrain_activations(x: Array, sharding) -> Array:
    """Returns `x` `[batch, seq, embed]` pinned to `sharding` (None: XLA's choice); a batch the sharding's batch
    axes do not divide (a single prompt on a pod) is left to XLA rather than refused."""
    if sharding is None:
        return x
    axes = sharding.spec[0] or ()
    n = math.prod(sharding.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    return x if x.shape[0] % n else jax.lax.with_sharding_constraint(x, sharding)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scanned over layers: carry = hidden,
    scanned input = this layer's cached (k, v) or None, scanned output = this call's new (k, v)."""

    config: DecoderConfig
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, x, past_kv, cos, sin, mask, past_mask):
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, c.compute_dtype, c.weight_dtype, name=name)  # noqa: E731
        past = None if past_kv is None else (*past_kv, past_mask)
        h, new_kv = Attention(c, name="attn")(norm("input_norm")(x), cos, sin, mask, past)
        x = x + h
        x = x + MLP(c, name="mlp")(norm("post_attn_norm")(x))
        return constrain_activations(x, self.activation_sharding), new_kv


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


class Decoder(nn.Module):
    """Token ids `[batch, seq]` -> DecoderOutput (logits `[batch, seq, vocab]`, final hidden, updated cache).

    activation_sharding: the NamedSharding of `[batch, seq, embed]` activations at block boundaries
    (`sharding.activation_sharding`), so the strategy governs activations as it does weights."""

    config: DecoderConfig
    activation_sharding: Any = None

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                              embedding_init=_dense_init(("vocab", "embed")))
        layer = DecoderLayer
        if c.remat != "none":
            layer = nn.remat(layer, prevent_cse=False, policy=_REMAT_POLICIES[c.remat])
        self.layers = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers,
            unroll=c.scan_unroll or c.num_layers,
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),  # past_kv scanned per layer
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.activation_sharding)
        self.final_norm = RMSNorm(c.rms_norm_eps, c.compute_dtype, c.weight_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                                    param_dtype=c.weight_dtype, kernel_init=_dense_init(("embed", "vocab")))

    def unembed(self, hidden: Array) -> Array:
        """Returns logits `[..., vocab]` for final hidden states `[..., embed]`."""
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, tokens: Array, positions: Optional[Array] = None, mask: Optional[Array] = None,
                 cache: Optional[KVCache] = None, compute_logits: bool = True,
                 cache_len: Optional[int] = None) -> DecoderOutput:
        """tokens/positions/mask `[batch, seq]`; mask marks real tokens (default all). With a cache the
        tokens occupy slots `cache.index ... cache.index + seq` and attend to every earlier valid slot.
        Without a cache, `cache_len` (static) returns a new cache of that many slots holding these tokens
        (a prefill that skips attending to empty slots); otherwise the new keys/values are discarded."""
        c = self.config
        b, t = tokens.shape
        mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(mask)
            if cache is not None:
                positions = positions + cache.next_positions()[:, None]
        chex.assert_shape([positions, mask], (b, t))
        # [batch, query, key] among this call's tokens: causal and only real keys. Cached slots all precede
        # them, so each query may see every valid cached slot.
        mask_new = jnp.tril(jnp.ones((t, t), bool))[None] & mask[:, None, :]
        past_kv = None if cache is None else (cache.k, cache.v)
        past_mask = None if cache is None else cache.valid[:, None, :]

        cos, sin = rope_tables(c, positions)
        x = constrain_activations(self.embed(tokens), self.activation_sharding)
        x, (k_new, v_new) = self.layers(x, past_kv, cos, sin, mask_new, past_mask)
        hidden = self.final_norm(x)
        logits = self.unembed(hidden) if compute_logits else None
        new_cache = None
        if cache is None and cache_len is not None:
            if cache_len < t:
                raise ValueError(f"cache_len={cache_len} is shorter than the {t} tokens to prefill")
            pad = [(0, 0)] * 3 + [(0, cache_len - t), (0, 0)]
            to_cache = lambda x: jnp.pad(x.swapaxes(2, 3), pad)  # noqa: E731  [L, B, K, slots, D]
            new_cache = KVCache(to_cache(k_new), to_cache(v_new), jnp.pad(mask, [(0, 0), (0, cache_len - t)]),
                                jnp.asarray(t, jnp.int32))
        if cache is not None:  # one in-place write of every layer's new keys/values at slot `index`
            at = (0, 0, 0, cache.index, 0)
            to_cache = lambda x: x.swapaxes(2, 3).astype(cache.k.dtype)  # noqa: E731  [L, B, K, T, D]
            new_cache = KVCache(jax.lax.dynamic_update_slice(cache.k, to_cache(k_new), at),
                                jax.lax.dynamic_update_slice(cache.v, to_cache(v_new), at),
                                jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index)),
                                cache.index + t)
        return DecoderOutput(logits, hidden, new_cache)
