"""Tiny random models for smoke runs and tests: a decoder over the tiny chat tokenizer and a static word tower.

They let the whole pipeline (CoT -> stage 1 -> GRPO -> eval) run in seconds with no downloads; the numbers
they give measure the machinery, not the method.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def tiny_decoder(texts: Sequence[str], key: jax.Array, mesh=None, strategy="dp", hidden_size: int = 32,
                 num_layers: int = 2, logit_scale: float = 1.0, whole_tags: bool = False):
    """Returns a random Llama `Model` (hidden 32, 2 layers) whose tokenizer is `tiny_chat_tokenizer(texts,
    whole_tags=whole_tags)` (vocabulary rounded up to a multiple of 8 so every sharding strategy divides it)."""
    from rporec_jax.data.testing import tiny_chat_tokenizer
    from rporec_jax.models.decoder_config import DecoderConfig
    from rporec_jax.models.loading import Model, init_params

    tok = tiny_chat_tokenizer(texts, multiple_of=8, whole_tags=whole_tags)
    cfg = DecoderConfig("llama", vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                        num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden_size // 4,
                        max_position_embeddings=4096)
    params = init_params(cfg, key, mesh, strategy)
    if logit_scale != 1.0:  # sharper next-token distributions: fewer near-ties between samples
        params["embed"]["embedding"] = params["embed"]["embedding"] * logit_scale
    return Model(cfg, params, tok, mesh=mesh, strategy=strategy)


def word_static_encoder(texts: Sequence[str], dim: int = 32, seed: int = 0):
    """Returns a static `TextEncoder` over the lower-cased words of `texts` with a random `[vocab, dim]` table
    (vocabulary rounded up to a multiple of 8 with unused rows, so every sharding strategy divides it)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from rporec_jax.models.text_encoder import TextEncoder, TextEncoderConfig

    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t.lower())})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    size = -(-len(vocab) // 8) * 8
    table = np.random.default_rng(seed).normal(size=(size, dim)).astype(np.float32)
    table[0] = 0
    return TextEncoder(TextEncoderConfig("static", size, dim), {"embedding": table}, tok)
