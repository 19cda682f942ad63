"""Recommendation heads (Recheads): user vectors `[batch, dim]` scored by dot product against item vectors.

Variants (RecheadConfig.variant):
- `text_fusion` (the reference): static towers E1/E2/E3 encode prompt, CoT and answer;
  h_x = MLP_p(E1(x)), h_c = MLP_c(E2(c)), s = (1 - f) h_x + f E3(a); o = Enc([h_x, h_c, s]) (post-LN
  Transformer encoder, no positions); g = gate_scale * sigmoid(MLP_g([s, o_3])); u = s + g o_3.
- `prompt_only`: u = MLP_p(E1(x)), the no-reasoning ablation.
- `hidden_state`: u = MLP_u(LLM hidden state at the end of the answer); items are projected from the same
  LLM's hidden state over each item's text by a trainable MLP_i (R2ec style).
Item vectors for the text variants come from a frozen fourth tower (precomputed matrix `[items + 1, dim]`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ("text_fusion", "prompt_only", "hidden_state")


@dataclasses.dataclass(frozen=True)
class RecheadConfig:
    """Rechead hyper-parameters; `vocab_size` is the text towers' tokenizer vocabulary."""

    variant: str = "text_fusion"
    dim: int = 384
    vocab_size: int = 30522
    mlp_hidden: int = 0  # 0: same as dim
    encoder_layers: int = 4
    encoder_heads: int = 8
    encoder_ffn: int = 2048
    dropout: float = 0.1
    gate_scale: float = 0.1
    leaky_slope: float = 0.01  # torch.nn.LeakyReLU default
    ln_eps: float = 1e-5  # torch.nn.LayerNorm default
    input_dim: int = 0  # hidden_state variant: the LLM's hidden size (0 in a run config = the backbone's)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"rechead variant {self.variant!r}; expected one of {VARIANTS}")
        if self.variant == "text_fusion" and self.dim % self.encoder_heads:
            raise ValueError(f"dim={self.dim} is not divisible by encoder_heads={self.encoder_heads}")
        if self.input_dim < 0:
            raise ValueError(f"input_dim={self.input_dim}; must be >= 0")

    @property
    def hidden(self) -> int:
        """Returns the MLP hidden width."""
        return self.mlp_hidden or self.dim


def _dense(features, names, name=None):
    return nn.Dense(features, name=name, kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), names), bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                                      names[-1:]))


def _layer_norm(eps, name=None):
    return nn.LayerNorm(epsilon=eps, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class StaticTower(nn.Module):
    """Mean of token embeddings over real tokens: ids/mask `[batch, len]` -> `[batch, dim]`; empty -> 0."""

    vocab_size: int
    dim: int

    @nn.compact
    def __call__(self, ids, mask):
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("rechead_vocab", "rechead_embed")),
                           (self.vocab_size, self.dim))
        m = mask.astype(jnp.float32)
        summed = jnp.einsum("bt,btd->bd", m, jnp.take(table, ids, axis=0))
        return summed / jnp.maximum(m.sum(-1, keepdims=True), 1.0)


class ProjMLP(nn.Module):
    """LN -> Linear -> LeakyReLU -> LN -> Linear -> LeakyReLU -> LN -> Linear (MLP_p / MLP_c)."""

    hidden: int
    out: int
    slope: float
    eps: float

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = _layer_norm(self.eps, f"ln{i}")(x)
            x = nn.leaky_relu(_dense(self.hidden, ("rechead_embed", "rechead_mlp"), f"fc{i}")(x), self.slope)
        return _dense(self.out, ("rechead_mlp", "rechead_embed"), "fc2")(_layer_norm(self.eps, "ln2")(x))


class EncoderLayer(nn.Module):
    """Post-LN Transformer encoder layer, as torch.nn.TransformerEncoderLayer (ReLU FFN, dropout)."""

    heads: int
    ffn: int
    dropout: float
    eps: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        d = x.shape[-1]
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, dropout_rate=self.dropout, deterministic=deterministic, name="attn",
            kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                     ("rechead_embed", "rechead_heads", "head_dim")),
            out_kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                         ("rechead_heads", "head_dim", "rechead_embed")))(x, x)
        x = _layer_norm(self.eps, "ln1")(x + nn.Dropout(self.dropout)(attn, deterministic))
        h = nn.relu(_dense(self.ffn, ("rechead_embed", "rechead_mlp"), "fc1")(x))
        h = _dense(d, ("rechead_mlp", "rechead_embed"), "fc2")(nn.Dropout(self.dropout)(h, deterministic))
        return _layer_norm(self.eps, "ln2")(x + nn.Dropout(self.dropout)(h, deterministic))


class Rechead(nn.Module):
    """User vector `[batch, dim]` from the variant's inputs (see module docstring)."""

    config: RecheadConfig

    @nn.compact
    def __call__(self, batch: dict, deterministic: bool = True) -> jax.Array:
        """batch keys: prompt_ids/prompt_mask, cot_ids/cot_mask, answer_ids/answer_mask `[B, len]`,
        format `[B]` (text variants); hidden `[B, input_dim]` (hidden_state)."""
        c = self.config
        mlp = lambda name: ProjMLP(c.hidden, c.dim, c.leaky_slope, c.ln_eps, name=name)  # noqa: E731
        if c.variant == "hidden_state":
            return mlp("mlp_u")(batch["hidden"].astype(jnp.float32))
        h_x = mlp("mlp_p")(StaticTower(c.vocab_size, c.dim, name="tower_prompt")(batch["prompt_ids"],
                                                                                 batch["prompt_mask"]))
        if c.variant == "prompt_only":
            return h_x
        h_c = mlp("mlp_c")(StaticTower(c.vocab_size, c.dim, name="tower_cot")(batch["cot_ids"], batch["cot_mask"]))
        a = StaticTower(c.vocab_size, c.dim, name="tower_answer")(batch["answer_ids"], batch["answer_mask"])
        f = batch["format"].astype(jnp.float32)[:, None]
        s = (1.0 - f) * h_x + f * a
        o = jnp.stack([h_x, h_c, s], axis=1)  # [B, 3, dim]; no positional encoding, as the reference
        for i in range(c.encoder_layers):
            o = EncoderLayer(c.encoder_heads, c.encoder_ffn, c.dropout, c.ln_eps, name=f"encoder_{i}")(
                o, deterministic)
        o3 = o[:, 2]
        g_in = jnp.concatenate([s, o3], axis=-1)
        g = nn.leaky_relu(_dense(c.dim, ("rechead_mlp", "rechead_embed"), "gate_fc0")(g_in), c.leaky_slope)
        g = c.gate_scale * nn.sigmoid(_dense(1, ("rechead_embed", None), "gate_fc1")(g))
        u = s + g * o3
        chex.assert_shape(u, (h_x.shape[0], c.dim))
        return u


class ItemProjection(nn.Module):
    """hidden_state variant: item vectors `[items, dim]` from LLM hidden states `[items, input_dim]`."""

    config: RecheadConfig

    @nn.compact
    def __call__(self, item_hidden: jax.Array) -> jax.Array:
        c = self.config
        return ProjMLP(c.hidden, c.dim, c.leaky_slope, c.ln_eps, name="mlp_i")(item_hidden.astype(jnp.float32))


def item_vectors(config: RecheadConfig, params: dict, item_inputs: jax.Array) -> jax.Array:
    """Returns the item matrix `[items + 1, dim]`: the frozen matrix itself for text variants, or the
    projection of per-item LLM hidden states for `hidden_state` (params['item_proj'])."""
    if config.variant != "hidden_state":
        return item_inputs
    return ItemProjection(config).apply({"params": params["item_proj"]}, item_inputs)


def init_rechead(config: RecheadConfig, key: jax.Array, example_batch: dict,
                 tower_init: Optional[jax.Array] = None) -> dict:
    """Returns boxed params {'user': ..., ['item_proj': ...]}; `tower_init` `[vocab, dim]` seeds every
    static tower (e.g. a sentence-transformers static embedding table)."""
    if config.variant == "hidden_state" and config.input_dim <= 0:
        raise ValueError("the hidden_state Rechead needs input_dim = the LLM hidden size")
    k1, k2 = jax.random.split(key)
    params = {"user": Rechead(config).init(k1, example_batch)["params"]}
    if config.variant == "hidden_state":
        x = jnp.zeros((1, config.input_dim), jnp.float32)
        params["item_proj"] = ItemProjection(config).init(k2, x)["params"]
    if tower_init is not None:
        for name in ("tower_prompt", "tower_cot", "tower_answer"):
            if name in params["user"]:
                box = params["user"][name]["embedding"]
                if tuple(tower_init.shape) != tuple(box.value.shape):
                    raise ValueError(f"tower_init has shape {tuple(tower_init.shape)}; the towers expect "
                                     f"{tuple(box.value.shape)} (vocab_size, dim)")
                params["user"][name]["embedding"] = box.replace_boxed(jnp.asarray(tower_init, jnp.float32))
    return params
