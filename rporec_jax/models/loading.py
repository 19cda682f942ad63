"""load_model / save_model: a decoder's config, sharded params and tokenizer from an HF dir or GGUF file."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rporec_jax import sharding as shd
from rporec_jax.cache import cache_dir, file_fingerprint
from rporec_jax.models.decoder import Decoder, DecoderOutput, KVCache, init_cache
from rporec_jax.models.decoder_config import DecoderConfig
from rporec_jax.models.safetensors_io import write_sharded
from rporec_jax.models.tokenizer import load_tokenizer
from rporec_jax.models.weights import GGUFFile, SafetensorsDir, expected_hf_names, hf_to_param, params_to_hf

# Tensors a checkpoint may hold that are not parameters of ours (buffers recomputed from the config).
_IGNORED = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder ready to run: `config`, `params` (placed on `mesh` by `strategy`), `tokenizer`, `hf_config`.

    All methods are pure in `params`, so they can be jitted, differentiated and given other params.
    """

    config: DecoderConfig
    params: Any
    tokenizer: Any = None
    hf_config: Any = None
    mesh: Optional[Mesh] = None
    strategy: Any = "dp"

    @property
    def module(self) -> Decoder:
        """Returns the Flax module (activations at block boundaries placed by the mesh and strategy)."""
        return Decoder(self.config, None if self.mesh is None else shd.activation_sharding(self.mesh, self.strategy))

    def apply(self, params, tokens, positions=None, mask=None) -> jax.Array:
        """Returns logits `[batch, seq, vocab]` for tokens `[batch, seq]` (mask marks real tokens)."""
        return self.forward(params, tokens, positions, mask).logits

    def forward(self, params, tokens, positions=None, mask=None, cache: Optional[KVCache] = None,
                compute_logits: bool = True, cache_len: Optional[int] = None) -> DecoderOutput:
        """Returns DecoderOutput(logits, final hidden `[batch, seq, embed]`, updated cache); `cache_len`
        without `cache` prefills a new cache of that many slots."""
        return self.module.apply({"params": params}, tokens, positions, mask, cache, compute_logits, cache_len)

    def unembed(self, params, hidden) -> jax.Array:
        """Returns logits `[..., vocab]` for final hidden states `[..., embed]` (for chunked log-probs)."""
        return self.module.apply({"params": params}, hidden, method=Decoder.unembed)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """Returns an empty KV cache of `max_len` slots."""
        return init_cache(self.config, batch, max_len, dtype)

    def param_shardings(self):
        """Returns the NamedSharding pytree of `params` under this model's mesh and strategy."""
        return param_shardings(self.config, self.mesh, self.strategy)


def abstract_params(config: DecoderConfig):
    """Returns the boxed (logically partitioned) ShapeDtypeStruct tree of a decoder's params."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens))["params"]


def param_shardings(config: DecoderConfig, mesh: Mesh, strategy="dp"):
    """Returns the NamedSharding pytree for a decoder's params on `mesh` under `strategy`."""
    return shd.tree_shardings(abstract_params(config), mesh, strategy)


def init_params(config: DecoderConfig, key: jax.Array, mesh: Optional[Mesh] = None, strategy="dp"):
    """Returns randomly initialised params, created directly with their shardings."""
    mesh = mesh or shd.make_mesh()
    shardings = param_shardings(config, mesh, strategy)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda k: nn.unbox(Decoder(config).init(k, tokens)["params"]), out_shardings=shardings)
    return init(key)


def gguf_to_hf_dir(path: str | os.PathLike) -> Path:
    """Returns an HF model directory (float32 safetensors, config, tokenizer) converted from a GGUF file.

    Parsing and dequantising a GGUF takes ~30 s for SmolLM2-135M, so the result is cached under
    `$RPOREC_CACHE_DIR/gguf/<fingerprint>` and later loads read plain safetensors in about a second.
    """
    from transformers import AutoConfig

    path = Path(path)
    out = cache_dir("gguf") / f"{path.stem}-{file_fingerprint(path, 'gguf-v1')}"
    if (out / "config.json").exists():
        return out
    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    source = GGUFFile(path, hf_config.num_attention_heads, hf_config.num_key_value_heads)
    tmp = out.with_name(out.name + f".partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _name_architecture(hf_config)
    hf_config.save_pretrained(str(tmp))
    write_sharded(tmp, {name: source[name] for name in source})
    load_tokenizer(path).save_pretrained(str(tmp))
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def _resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Returns the HF model directory to read for an HF dir or a .gguf file (converted once, cached)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json; expected an HF model directory")
        return path
    if path.suffix == ".gguf":
        return gguf_to_hf_dir(path)
    raise ValueError(f"{path}: expected an HF model directory (config.json + *.safetensors) or a .gguf file")


def load_model(path: str | os.PathLike, dtype: str = "float32", param_dtype: Optional[str] = None,
               mesh: Optional[Mesh] = None, strategy="dp", tokenizer: bool = True, **config_overrides) -> Model:
    """Returns a Model read from an HF safetensors directory or a GGUF file, each tensor placed directly
    on its sharding (default mesh: all devices on the data axis; default strategy: replicated params)."""
    from transformers import AutoConfig

    path = _resolve_checkpoint(path)
    hf_config = AutoConfig.from_pretrained(str(path))
    config = DecoderConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    source = SafetensorsDir(path)
    mesh = mesh or shd.make_mesh()
    abstract = abstract_params(config)
    shapes = nn.unbox(abstract)

    wanted = expected_hf_names(shapes, config)
    unexpected = sorted(n for n in source if n not in wanted and not n.endswith(_IGNORED)
                        and not (config.tie_word_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) for a "
                         f"{config.model_type} model with this config")

    shardings = shd.tree_shardings(abstract, mesh, strategy)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    placed = []
    for (kpath, spec), sharding in zip(flat, jax.tree_util.tree_leaves(shardings)):
        keys = tuple(str(k.key) for k in kpath)
        host = hf_to_param(source, config, keys, spec.shape, spec.dtype)
        placed.append(jax.make_array_from_callback(spec.shape, sharding, lambda idx, h=host: h[idx]))
    params = jax.tree_util.tree_unflatten(treedef, placed)
    tok = load_tokenizer(path) if tokenizer else None
    return Model(config, params, tok, hf_config, mesh, strategy)


CAUSAL_LM_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _name_architecture(hf_config) -> None:
    """Sets `architectures` when missing (GGUF-derived configs lack it; TRL and pipelines read it)."""
    if not getattr(hf_config, "architectures", None) and hf_config.model_type in CAUSAL_LM_CLASSES:
        hf_config.architectures = [CAUSAL_LM_CLASSES[hf_config.model_type]]


def to_hf_config(config: DecoderConfig):
    """Returns a `transformers` config equivalent to `config` (for exporting models built from scratch)."""
    from transformers import AutoConfig

    rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta, **dict(config.rope_params)}
    kw = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
              head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_parameters=rope,
              max_position_embeddings=config.max_position_embeddings,
              tie_word_embeddings=config.tie_word_embeddings)
    if config.model_type != "qwen2":
        kw["attention_bias"] = config.qkv_bias
    if config.model_type == "llama":
        kw["mlp_bias"] = config.mlp_bias
    return AutoConfig.for_model(config.model_type, **kw)


def save_model(model_or_params, out_dir: str | os.PathLike, config: Optional[DecoderConfig] = None,
               hf_config: Any = None, tokenizer: Any = None, dtype: Optional[str] = None) -> Path:
    """Writes an HF model directory (config.json, safetensors, tokenizer) that `transformers` loads.

    Pass a Model, or params plus `config` (and optionally the original `hf_config` / `tokenizer`).
    `dtype` (e.g. "bfloat16") overrides the stored dtype; default keeps the param dtype.
    The directory is written next to `out_dir` first and renamed, so an interrupted export leaves nothing.
    """
    if isinstance(model_or_params, Model):
        m = model_or_params
        params, config = m.params, m.config
        hf_config, tokenizer = hf_config or m.hf_config, tokenizer or m.tokenizer
    else:
        params = model_or_params
        if config is None:
            raise ValueError("save_model(params, ...) needs config=DecoderConfig")
    out_dir = Path(out_dir)
    tensors = params_to_hf(params, config)
    if dtype is not None:
        np_dtype = np.dtype(jnp.dtype(dtype))
        tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
    hf_config = hf_config or to_hf_config(config)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config.tie_word_embeddings = config.tie_word_embeddings
    hf_config.dtype = str(next(iter(tensors.values())).dtype)
    _name_architecture(hf_config)
    hf_config.save_pretrained(str(tmp))
    write_sharded(tmp, tensors)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
