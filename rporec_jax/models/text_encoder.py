"""Text towers for the Rechead: a static embedding bag and a BERT/MiniLM encoder, both mean-pooled.

    enc = load_text_encoder("path/to/static-retrieval-mrl-en-v1")      # or a BERT / all-MiniLM-L6-v2 dir
    ids, mask = enc.tokenize(["some text", ""], max_len=256)            # NumPy [batch, bucket]
    vecs = enc.apply(enc.params, ids, mask)                              # [batch, dim] float32
    matrix = encode_texts(enc, item_texts)                               # NumPy [num_texts, dim]

`static`: mean of token embeddings over real tokens (no special tokens, as sentence-transformers'
StaticEmbedding does); a text with no tokens maps to the zero vector.
`bert`: embeddings (word + position + token type) -> LayerNorm -> post-LN layers (exact-erf GELU MLP) ->
mean over real tokens, optionally L2-normalised (sentence-transformers' Normalize module).

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `head_dim`, `mlp`, `layers`, `norm`), so
`rporec_jax.sharding.tree_shardings` places them under any strategy. Tokenizers are `tokenizers.Tokenizer`
objects with their file's own truncation and padding switched off: `max_len` is the only length limit, and
every truncation is counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rporec_jax import sharding as shd
from rporec_jax.models.weights import SafetensorsDir

Array = jax.Array
log = logging.getLogger(__name__)

_NEG_INF = -1e30  # finite: a fully padded row (batch filler) softmaxes to uniform instead of NaN
_MIN_BUCKET = 16
KINDS = ("static", "bert")


# -------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Static description of a text tower (hashable, so it can be a static jit argument).

    kind: 'static' (embedding bag) or 'bert'. The BERT-only fields are 0 for a static tower.
    add_special_tokens: whether tokenisation adds the tokenizer's template tokens ([CLS] ... [SEP]).
    """

    kind: str
    vocab_size: int
    hidden_size: int
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int = 0
    max_position_embeddings: int = 0
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-12
    normalize: bool = False
    dtype: str = "float32"
    add_special_tokens: bool = False
    pad_id: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TextEncoderConfig.kind={self.kind!r}; expected one of {KINDS}")
        if self.kind == "bert" and (self.num_layers < 1 or self.num_heads < 1 or self.hidden_size % self.num_heads):
            raise ValueError(f"BERT config needs num_layers >= 1 and hidden_size ({self.hidden_size}) divisible by "
                             f"num_heads ({self.num_heads})")

    @property
    def head_dim(self) -> int:
        """Returns hidden_size // num_heads."""
        return self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        """Returns the jnp dtype of parameters and activations (norms, softmax and pooling run in float32)."""
        return jnp.dtype(self.dtype)


# ------------------------------------------------------------------------------------------- modules

def _init(init, names):
    return nn.with_logical_partitioning(init, names)


def _masked_mean(x: Array, mask: Array) -> Array:
    """Returns float32 `[batch, embed]`: mean of x `[batch, seq, embed]` over mask `[batch, seq]` (0 if empty)."""
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(x.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _l2_normalize(x: Array) -> Array:
    # eps as torch.nn.functional.normalize (what sentence-transformers' Normalize calls)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class StaticEmbedder(nn.Module):
    """ids, mask `[batch, seq]` -> float32 `[batch, embed]`: mean of the real tokens' embeddings."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, ids: Array, mask: Array) -> Array:
        c = self.config
        table = self.param("embedding", _init(nn.initializers.normal(1.0), ("vocab", "embed")),
                           (c.vocab_size, c.hidden_size), c.compute_dtype)
        out = _masked_mean(jnp.take(table, ids, axis=0), mask)
        return _l2_normalize(out) if c.normalize else out


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (biased variance, HF BERT semantics), cast back to dtype."""

    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", _init(nn.initializers.ones, ("norm",)), (d,), self.dtype)
        bias = self.param("bias", _init(nn.initializers.zeros, ("norm",)), (d,), self.dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class BertLayer(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x)). Scanned: carry = hidden."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array):
        c = self.config
        dt = c.compute_dtype
        dense = lambda feats, names, name, axis=-1: nn.DenseGeneral(  # noqa: E731
            feats, axis=axis, dtype=dt, param_dtype=dt, name=name,
            kernel_init=_init(nn.initializers.normal(0.02), names[0]), bias_init=_init(nn.initializers.zeros, names[1]))
        heads = (c.num_heads, c.head_dim)
        qkv_names = (("embed", "heads", "head_dim"), ("heads", "head_dim"))
        q = dense(heads, qkv_names, "q")(x) * (c.head_dim ** -0.5)
        k = dense(heads, qkv_names, "k")(x)
        v = dense(heads, qkv_names, "v")(x)
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(key_mask[:, None, None, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = jnp.einsum("bhts,bshd->bthd", probs, v)
        attn = dense(c.hidden_size, (("heads", "head_dim", "embed"), ("embed",)), "o", axis=(-2, -1))(attn)
        x = LayerNorm(c.layer_norm_eps, dt, name="attn_norm")(x + attn)
        h = dense(c.intermediate_size, (("embed", "mlp"), ("mlp",)), "mlp_in")(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=False).astype(dt)  # HF "gelu" is the exact erf form
        h = dense(c.hidden_size, (("mlp", "embed"), ("embed",)), "mlp_out")(h)
        return LayerNorm(c.layer_norm_eps, dt, name="mlp_norm")(x + h), None


class BertEmbeddings(nn.Module):
    """ids `[batch, seq]` -> LN(word + position + token-type-0 embeddings) `[batch, seq, embed]`."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        c = self.config
        dt = c.compute_dtype
        emb = lambda n, names, name: self.param(  # noqa: E731
            name, _init(nn.initializers.normal(0.02), names), (n, c.hidden_size), dt)
        word = emb(c.vocab_size, ("vocab", "embed"), "word")
        pos = emb(c.max_position_embeddings, (None, "embed"), "position")
        tok_type = emb(c.type_vocab_size, (None, "embed"), "token_type")
        t = ids.shape[1]
        # one segment per text, as sentence-transformers feeds single sentences (token_type_ids all 0)
        x = jnp.take(word, ids, axis=0) + pos[None, :t] + tok_type[None, None, 0]
        return LayerNorm(c.layer_norm_eps, dt, name="norm")(x)


class BertEncoder(nn.Module):
    """ids, mask `[batch, seq]` -> float32 `[batch, embed]`: BERT hidden states mean-pooled over real tokens."""

    config: TextEncoderConfig

    @nn.compact
    def __call__(self, ids: Array, mask: Array) -> Array:
        c = self.config
        mask = mask.astype(bool)
        x = BertEmbeddings(c, name="embeddings")(ids)
        layers = nn.scan(BertLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers,
                         in_axes=(nn.broadcast,), metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = layers(c, name="layers")(x, mask)
        out = _masked_mean(x, mask)
        return _l2_normalize(out) if c.normalize else out


def make_module(config: TextEncoderConfig) -> nn.Module:
    """Returns the Flax module of a config (StaticEmbedder or BertEncoder)."""
    return StaticEmbedder(config) if config.kind == "static" else BertEncoder(config)


def _check_inputs(config: TextEncoderConfig, ids, mask) -> None:
    chex.assert_rank(ids, 2)
    chex.assert_equal_shape([ids, mask])
    if config.kind == "bert" and ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"BERT input of {ids.shape[1]} tokens exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}; tokenize with a smaller max_len")


def _forward(config: TextEncoderConfig, params, ids: Array, mask: Array) -> Array:
    _check_inputs(config, ids, mask)
    out = make_module(config).apply({"params": params}, ids, mask)
    chex.assert_shape(out, (ids.shape[0], config.hidden_size))
    return out


_forward_jit = jax.jit(_forward, static_argnums=0)  # jax's compile cache, keyed by (config, bucket shape)


def abstract_params(config: TextEncoderConfig):
    """Returns the boxed (logically partitioned) ShapeDtypeStruct tree of a text tower's params."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: make_module(config).init(jax.random.key(0), ids, ids))["params"]


# ------------------------------------------------------------------------------------------- encoder

@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """A text tower ready to run: `config`, `params` (placed on `mesh` by `strategy`), `tokenizer`
    (a `tokenizers.Tokenizer` with truncation and padding off). `apply` is pure in `params`, so it can be
    jitted, differentiated (trainable towers) and given other params."""

    config: TextEncoderConfig
    params: Any
    tokenizer: Any
    mesh: Optional[Mesh] = None
    strategy: Any = "dp"

    @property
    def kind(self) -> str:
        """Returns 'static' or 'bert'."""
        return self.config.kind

    @property
    def dim(self) -> int:
        """Returns the output dimension."""
        return self.config.hidden_size

    @property
    def module(self) -> nn.Module:
        """Returns the Flax module."""
        return make_module(self.config)

    def apply(self, params, ids, mask) -> Array:
        """Returns float32 `[batch, dim]` text vectors for ids, mask `[batch, seq]` (mask marks real tokens)."""
        # jitted so eager calls do not dispatch op by op; inside a caller's jit/grad it simply inlines
        return _forward_jit(self.config, params, ids, mask)

    def param_shardings(self):
        """Returns the NamedSharding pytree of `params` under this encoder's mesh and strategy."""
        return shd.tree_shardings(abstract_params(self.config), self.mesh or shd.make_mesh(), self.strategy)

    def tokenize(self, texts: Sequence[str], max_len: Optional[int] = 256, return_truncated: bool = False):
        """Returns NumPy (ids int32 `[batch, bucket]`, mask bool `[batch, bucket]`) right-padded to a bucket
        (a power of two >= 16, at most `max_len`), plus the number of truncated texts if `return_truncated`.

        `max_len` counts special tokens too; None means no truncation (a BERT tower then stops at its
        max_position_embeddings)."""
        seqs, n_trunc = _token_ids(self, texts, max_len)
        ids, mask = _pad(seqs, _bucket(max((len(s) for s in seqs), default=0), self._limit(max_len)),
                         self.config.pad_id)
        return (ids, mask, n_trunc) if return_truncated else (ids, mask)

    def _limit(self, max_len: Optional[int]) -> Optional[int]:
        if self.kind == "bert":
            cap = self.config.max_position_embeddings
            if max_len is not None and max_len > cap:
                raise ValueError(f"max_len={max_len} exceeds this BERT's max_position_embeddings={cap}")
            return cap if max_len is None else max_len
        return max_len


def _bucket(longest: int, limit: Optional[int]) -> int:
    """Returns the padded length: the next power of two >= max(longest, 16), capped at `limit`."""
    b = _MIN_BUCKET
    while b < longest:
        b *= 2
    return b if limit is None else min(b, limit)


def _token_ids(enc: TextEncoder, texts: Sequence[str], max_len: Optional[int]) -> tuple[list[list[int]], int]:
    """Returns per-text token id lists truncated to the length limit, and how many texts were truncated."""
    if isinstance(texts, str):
        raise TypeError("tokenize/encode_texts take a sequence of texts, not a single string")
    limit = enc._limit(max_len)
    tok = enc.tokenizer
    specials = tok.num_special_tokens_to_add(False) if enc.config.add_special_tokens else 0
    if limit is not None and limit <= specials:
        raise ValueError(f"max_len={limit} leaves no room for text after {specials} special tokens")
    encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    out, n_trunc = [], 0
    for e in encodings:
        if limit is not None and len(e.ids) > limit - specials:
            n_trunc += 1
            e.truncate(limit - specials)
        # special tokens go on after truncation, so a truncated BERT input still ends with [SEP] (as HF does)
        out.append(tok.post_process(e).ids if specials else e.ids)
    return out, n_trunc


def _pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int, rows: Optional[int] = None):
    """Returns right-padded NumPy ids int32 `[rows, length]` and mask bool `[rows, length]`."""
    rows = len(seqs) if rows is None else rows
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = True
    return ids, mask


def encode_texts(encoder: TextEncoder, texts: Sequence[str], batch_size: int = 256, max_len: Optional[int] = 256,
                 progress: bool = True) -> np.ndarray:
    """Returns float32 NumPy `[len(texts), dim]` vectors of `texts`, in input order.

    Texts are sorted by token count so each batch pads to a small bucket; one compile per bucket, batches
    sharded over the mesh's ('data', 'fsdp') axes. Truncations (over `max_len` tokens) are logged.
    """
    from tqdm.auto import tqdm

    n = len(texts)
    seqs, n_trunc = _token_ids(encoder, texts, max_len)
    if n_trunc:
        log.warning("encode_texts: %d of %d texts exceed max_len=%s tokens and were truncated", n_trunc, n, max_len)
    if n == 0:
        return np.zeros((0, encoder.dim), np.float32)
    mesh = encoder.mesh or shd.make_mesh()
    shards = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
    rows = -(-min(batch_size, n) // shards) * shards  # fixed batch rows: one compile per length bucket
    limit = encoder._limit(max_len)
    in_sharding = shd.batch_sharding(mesh, 2)
    # longest first: the biggest bucket compiles (and fails on memory, if it will) at the start
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    out = np.zeros((n, encoder.dim), np.float32)
    pending = None  # fetch batch i-1 while batch i runs, so host padding overlaps device work
    with tqdm(total=n, unit="text", disable=not progress, desc=f"encode ({encoder.kind})") as bar:
        for start in range(0, n, rows):
            idx = order[start:start + rows]
            chunk = [seqs[i] for i in idx]
            ids, mask = _pad(chunk, _bucket(max(len(s) for s in chunk), limit), encoder.config.pad_id, rows)
            ids, mask = jax.device_put((ids, mask), in_sharding)
            result = _forward_jit(encoder.config, encoder.params, ids, mask)
            if pending is not None:
                out[pending[0]] = shd.to_host(pending[1])[:len(pending[0])]
                bar.update(len(pending[0]))
            pending = (idx, result)
        out[pending[0]] = shd.to_host(pending[1])[:len(pending[0])]
        bar.update(len(pending[0]))
    return out


# ---------------------------------------------------------------------------------------------- loading

def _bias(shape):
    return lambda w, c: w.reshape(shape(c))


_heads = lambda c: (c.num_heads, c.head_dim)  # noqa: E731
_kernel_heads = lambda w, c: w.T.reshape(w.shape[1], c.num_heads, c.head_dim)  # noqa: E731
_same = lambda w, c: w  # noqa: E731
_T = lambda w, c: w.T  # noqa: E731

# our BERT param path -> (HF tensor name, HF [out, in] layout -> ours); "{i}" marks per-layer tensors
# stacked on the scanned `layers` axis.
_BERT_TABLE = {
    ("embeddings", "word"): ("embeddings.word_embeddings.weight", _same),
    ("embeddings", "position"): ("embeddings.position_embeddings.weight", _same),
    ("embeddings", "token_type"): ("embeddings.token_type_embeddings.weight", _same),
    ("embeddings", "norm", "scale"): ("embeddings.LayerNorm.weight", _same),
    ("embeddings", "norm", "bias"): ("embeddings.LayerNorm.bias", _same),
    **{("layers", x, "kernel"): (f"encoder.layer.{{i}}.attention.self.{hf}.weight", _kernel_heads)
       for x, hf in (("q", "query"), ("k", "key"), ("v", "value"))},
    **{("layers", x, "bias"): (f"encoder.layer.{{i}}.attention.self.{hf}.bias", _bias(_heads))
       for x, hf in (("q", "query"), ("k", "key"), ("v", "value"))},
    ("layers", "o", "kernel"): ("encoder.layer.{i}.attention.output.dense.weight",
                                lambda w, c: w.T.reshape(c.num_heads, c.head_dim, w.shape[0])),
    ("layers", "o", "bias"): ("encoder.layer.{i}.attention.output.dense.bias", _same),
    ("layers", "attn_norm", "scale"): ("encoder.layer.{i}.attention.output.LayerNorm.weight", _same),
    ("layers", "attn_norm", "bias"): ("encoder.layer.{i}.attention.output.LayerNorm.bias", _same),
    ("layers", "mlp_in", "kernel"): ("encoder.layer.{i}.intermediate.dense.weight", _T),
    ("layers", "mlp_in", "bias"): ("encoder.layer.{i}.intermediate.dense.bias", _same),
    ("layers", "mlp_out", "kernel"): ("encoder.layer.{i}.output.dense.weight", _T),
    ("layers", "mlp_out", "bias"): ("encoder.layer.{i}.output.dense.bias", _same),
    ("layers", "mlp_norm", "scale"): ("encoder.layer.{i}.output.LayerNorm.weight", _same),
    ("layers", "mlp_norm", "bias"): ("encoder.layer.{i}.output.LayerNorm.bias", _same),
}
# Tensors a BERT checkpoint may hold that are not ours: buffers, and the [CLS] pooler mean pooling never reads.
_BERT_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.dense.weight", "pooler.dense.bias")


class _BertNames(Mapping[str, np.ndarray]):
    """HF BERT tensor names over a SafetensorsDir whose names may carry a `bert.` prefix (BertFor* heads) or
    the old TF `LayerNorm.gamma/beta` spelling."""

    def __init__(self, path: Path):
        self.path = path
        self._src = SafetensorsDir(path)
        self._map = {}
        for name in self._src:
            ours = name[len("bert."):] if name.startswith("bert.") else name
            ours = ours.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
            self._map[ours] = name

    def __getitem__(self, key):
        return self._src[self._map[key]]

    def __contains__(self, key):
        return key in self._map

    def __iter__(self):
        return iter(self._map)

    def __len__(self):
        return len(self._map)


def _bert_host_param(src: _BertNames, config: TextEncoderConfig, path: tuple[str, ...], shape, dtype) -> np.ndarray:
    """Returns our param at `path` as a host array (layer tensors stacked), checking names and shapes."""
    hf_name, convert = _BERT_TABLE[path]
    names = [hf_name.format(i=i) for i in range(config.num_layers)] if "{i}" in hf_name else [hf_name]
    want = tuple(shape[1:]) if "{i}" in hf_name else tuple(shape)
    arrays = []
    for n in names:
        if n not in src:
            raise KeyError(f"{src.path}: checkpoint is missing tensor {n!r} (parameter {'/'.join(path)})")
        w = convert(np.asarray(src[n], np.float32), config)
        if tuple(w.shape) != want:
            raise ValueError(f"{src.path}: tensor {n!r} has shape {tuple(src[n].shape)}, which converts to "
                             f"{tuple(w.shape)}; parameter {'/'.join(path)} expects {want}")
        arrays.append(w)
    out = np.stack(arrays) if "{i}" in hf_name else arrays[0]
    return out.astype(np.dtype(jnp.dtype(dtype)))


def _place(config: TextEncoderConfig, host_param, mesh: Optional[Mesh], strategy):
    """Returns the param tree with each leaf built from `host_param(path, shape, dtype)` on its sharding."""
    mesh = mesh or shd.make_mesh()
    abstract = abstract_params(config)
    shardings = shd.tree_shardings(abstract, mesh, strategy)
    flat, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))
    placed = []
    for (kpath, spec), sharding in zip(flat, jax.tree_util.tree_leaves(shardings)):
        host = host_param(tuple(str(k.key) for k in kpath), spec.shape, spec.dtype)
        placed.append(jax.make_array_from_callback(spec.shape, sharding, lambda idx, h=host: h[idx]))
    return jax.tree_util.tree_unflatten(treedef, placed), mesh


def _load_tokenizer(path: Path):
    """Returns the `tokenizers.Tokenizer` of a directory with its own truncation and padding switched off."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if file.exists():
        tok = Tokenizer.from_file(str(file))
    else:
        try:  # e.g. a BERT dir with only vocab.txt: transformers builds the fast tokenizer
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
        except Exception as e:  # noqa: BLE001  any failure means the same thing to the user
            raise FileNotFoundError(f"{path}: no tokenizer.json, and transformers could not build a fast "
                                    f"tokenizer from the directory ({e})") from e
    # files often carry a fixed truncation/padding (all-MiniLM-L6-v2's: 128); ours is max_len, counted
    tok.no_truncation()
    tok.no_padding()
    return tok


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read JSON ({e})") from e


def _load_bert(path: Path, dtype: str, normalize: bool, mesh, strategy) -> TextEncoder:
    cfg_file = path / "config.json"
    hf = _read_json(cfg_file)
    if hf.get("model_type") != "bert":
        raise ValueError(f"{cfg_file}: model_type={hf.get('model_type')!r}; the BERT tower reads 'bert' models")
    for field, want in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if hf.get(field, want) != want:
            raise ValueError(f"{cfg_file}: {field}={hf[field]!r}; only {want!r} is implemented")
    config = TextEncoderConfig(
        kind="bert", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12), normalize=normalize, dtype=dtype, add_special_tokens=True,
        pad_id=hf.get("pad_token_id") or 0)
    src = _BertNames(path)
    wanted = {n.format(i=i) for n, _ in _BERT_TABLE.values() for i in range(config.num_layers)}
    unexpected = sorted(n for n in src if n not in wanted and n not in _BERT_IGNORED)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for a BERT encoder")
    params, mesh = _place(config, lambda p, s, d: _bert_host_param(src, config, p, s, d), mesh, strategy)
    return TextEncoder(config, params, _load_tokenizer(path), mesh, strategy)


def _static_table(path: Path) -> np.ndarray:
    """Returns the `[vocab, dim]` table of a StaticEmbedding (or model2vec) safetensors directory."""
    src = SafetensorsDir(path)
    if "embedding.weight" in src:
        return np.asarray(src["embedding.weight"], np.float32)
    if "embeddings" in src:  # model2vec layout; folded as sentence-transformers' StaticEmbedding.load does
        table = np.asarray(src["embeddings"], np.float32)
        if "mapping" in src:
            table = table[np.asarray(src["mapping"], np.int64)]
        if "weights" in src:
            table = table * np.asarray(src["weights"], np.float32)[:, None]
        return table
    raise KeyError(f"{path}: no tensor 'embedding.weight' (StaticEmbedding) or 'embeddings' (model2vec); "
                   f"found {sorted(src)[:5]}")


def _static_encoder(table: np.ndarray, tokenizer, source: Path, dtype: str, normalize: bool, mesh,
                    strategy) -> TextEncoder:
    if table.ndim != 2:
        raise ValueError(f"{source}: embedding table has shape {table.shape}; expected [vocab, dim]")
    if tokenizer.get_vocab_size() > table.shape[0]:
        raise ValueError(f"{source}: tokenizer has {tokenizer.get_vocab_size()} tokens but the embedding table only "
                         f"{table.shape[0]} rows")
    config = TextEncoderConfig(kind="static", vocab_size=table.shape[0], hidden_size=table.shape[1],
                               normalize=normalize, dtype=dtype, add_special_tokens=False)
    params, mesh = _place(config, lambda p, s, d: table.astype(np.dtype(jnp.dtype(d))), mesh, strategy)
    return TextEncoder(config, params, tokenizer, mesh, strategy)


def static_from_bert(path: str | os.PathLike, dtype: str = "float32", normalize: bool = False,
                     mesh: Optional[Mesh] = None, strategy="dp") -> TextEncoder:
    """Returns a static tower whose table is a BERT directory's word embeddings (`[vocab, hidden]`), with that
    BERT's tokenizer (no special tokens, as sentence-transformers' StaticEmbedding tokenises)."""
    path = _resolve_module_dir(Path(path), "bert")
    src = _BertNames(path)
    name = "embeddings.word_embeddings.weight"
    if name not in src:
        raise KeyError(f"{path}: checkpoint has no tensor {name!r} to initialise a static tower from")
    return _static_encoder(np.asarray(src[name], np.float32), _load_tokenizer(path), path, dtype, normalize,
                           mesh, strategy)


def _resolve_module_dir(path: Path, kind: Optional[str]) -> Path:
    """Returns the directory holding the weights for a plain or sentence-transformers directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder path {path} is not a directory")
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return path
    modules = _read_json(modules_file)
    first = modules[0] if modules else {}
    mtype = first.get("type", "")
    if not (mtype.endswith("StaticEmbedding") or mtype.endswith("Transformer")):
        raise ValueError(f"{modules_file}: first module has type {mtype!r}; expected a Transformer or "
                         f"StaticEmbedding module")
    for m in modules[1:]:
        t = m.get("type", "")
        if t.endswith("Pooling"):
            pool_file = path / m["path"] / "config.json"
            pool = _read_json(pool_file)
            # newer sentence-transformers write {"pooling_mode": "mean"}, older ones boolean pooling_mode_* flags
            mode = pool.get("pooling_mode")
            on = ([mode] if isinstance(mode, str) else list(mode)) if mode is not None else sorted(
                k for k, v in pool.items() if k.startswith("pooling_mode") and v)
            if on not in (["mean"], ["pooling_mode_mean_tokens"]) and kind != "static":
                raise ValueError(f"{pool_file}: pooling {on}; only mean pooling is implemented")
        elif not t.endswith("Normalize"):
            raise ValueError(f"{modules_file}: module {m.get('name')!r} has type {t!r}; only Pooling (mean) and "
                             f"Normalize may follow the encoder")
    return path / first.get("path", "")


def _detect_kind(path: Path) -> str:
    if (path / "config.json").exists():
        return "bert"
    if (path / "tokenizer.json").exists() and any(path.glob("*.safetensors")):
        return "static"
    raise FileNotFoundError(f"{path}: neither a BERT directory (config.json) nor a StaticEmbedding directory "
                            f"(model.safetensors + tokenizer.json)")


def load_text_encoder(path: str | os.PathLike, kind: Optional[str] = None, dtype: str = "float32",
                      normalize: bool = False, mesh: Optional[Mesh] = None, strategy="dp") -> TextEncoder:
    """Returns a TextEncoder read from a sentence-transformers directory (StaticEmbedding or BERT Transformer
    + mean Pooling [+ Normalize]), a StaticEmbedding/model2vec folder or an HF BERT directory; params placed on
    `mesh` (default: all devices on the data axis) by `strategy`.

    kind: None detects it; 'static' on a BERT directory initialises from its word embeddings (static_from_bert).
    normalize: L2-normalise outputs (not read from a Normalize module: pass True to match such a pipeline).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS} or None")
    path = _resolve_module_dir(Path(path), kind)
    found = _detect_kind(path)
    if kind == "static" and found == "bert":
        return static_from_bert(path, dtype, normalize, mesh, strategy)
    if kind == "bert" and found == "static":
        raise ValueError(f"{path}: kind='bert' requested, but the directory holds a static embedding table")
    if found == "bert":
        return _load_bert(path, dtype, normalize, mesh, strategy)
    return _static_encoder(_static_table(path), _load_tokenizer(path), path, dtype, normalize, mesh, strategy)
