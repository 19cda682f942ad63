"""Checkpoint readers (HF safetensors dirs, GGUF files) and the HF-name <-> param-tree conversion.

Both readers yield HF tensor names (`model.layers.3.self_attn.q_proj.weight`, torch layout `[out, in]`) as
NumPy arrays, so one table converts either into our param tree and back (export).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from rporec_jax.models.decoder_config import DecoderConfig

# ---------------------------------------------------------------------------------------------- readers

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsDir(Mapping[str, np.ndarray]):
    """Read-only mapping HF tensor name -> memory-mapped NumPy array over one or more .safetensors files.

    Parses the safetensors header directly because `safe_open(framework="numpy")` cannot return bfloat16
    and the flax/torch frameworks would copy every tensor onto a default device first.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no model.safetensors(.index.json) found")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            file = path / name
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                self._where[key] = (file, info, 8 + n)

    def __getitem__(self, key: str) -> np.ndarray:
        file, info, base = self._where[key]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        count = (end - begin) // dtype.itemsize
        arr = np.memmap(file, dtype=dtype, mode="r", offset=base + begin, shape=(count,))
        return arr.reshape(info["shape"])

    def __contains__(self, key) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}


class GGUFFile(Mapping[str, np.ndarray]):
    """Read-only mapping HF tensor name -> dequantised float32 NumPy array of a GGUF file.

    llama.cpp stores Llama q/k projection rows interleaved for its rotary layout; like transformers we undo
    that permutation so the weights match HF's half-split RoPE.
    """

    def __init__(self, path: str | os.PathLike, num_heads: int, num_kv_heads: int):
        import gguf

        self.path = Path(path)
        self._reader = gguf.GGUFReader(str(self.path))
        arch = self._reader.fields["general.architecture"].contents()
        self._permute_qk = arch == "llama"
        self._heads = {"q": num_heads, "k": num_kv_heads}
        self._tensors = {}
        for t in self._reader.tensors:
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
            if m and m.group(2) in _GGUF_LAYER:
                self._tensors[f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}"] = t
            elif t.name in _GGUF_GLOBAL:
                self._tensors[_GGUF_GLOBAL[t.name]] = t
            # anything else (e.g. rope_freqs) is not a weight of ours; loading reports what is missing

    def __getitem__(self, key: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[key]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # ggml lists dims fastest-first
        proj = re.search(r"self_attn\.([qk])_proj\.(weight|bias)$", key)
        if self._permute_qk and proj:
            n = self._heads[proj.group(1)]
            w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return w

    def __contains__(self, key) -> bool:  # Mapping's default would dequantise the tensor to answer
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


# ------------------------------------------------------------------------------------ name/layout table

def _to_kernel(out_shape):
    """HF Linear weight [out, in] -> kernel [in, *out_shape]."""
    return lambda w, c: w.T.reshape(w.shape[1], *out_shape(c))


def _from_kernel(w):
    return w.reshape(w.shape[0], -1).T


def _o_to_kernel(w, c):
    return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _o_from_kernel(w):
    return w.reshape(-1, w.shape[-1]).T


_same = lambda w, c=None: w  # noqa: E731


def _bias(shape):
    return lambda w, c: w.reshape(shape(c))


_flat = lambda w: w.reshape(-1)  # noqa: E731
_heads = lambda c: (c.num_heads, c.head_dim)  # noqa: E731
_kv = lambda c: (c.num_kv_heads, c.head_dim)  # noqa: E731

# our param path -> (HF name, HF->ours, ours->HF); "{i}" marks per-layer tensors stacked on axis 0.
PARAM_TABLE: dict[tuple[str, ...], tuple[str, Callable, Callable]] = {
    ("embed", "embedding"): ("model.embed_tokens.weight", _same, _same),
    ("final_norm", "scale"): ("model.norm.weight", _same, _same),
    ("lm_head", "kernel"): ("lm_head.weight", lambda w, c: w.T, lambda w: w.T),
    ("layers", "input_norm", "scale"): ("model.layers.{i}.input_layernorm.weight", _same, _same),
    ("layers", "post_attn_norm", "scale"): ("model.layers.{i}.post_attention_layernorm.weight", _same, _same),
    ("layers", "attn", "q", "kernel"): ("model.layers.{i}.self_attn.q_proj.weight", _to_kernel(_heads), _from_kernel),
    ("layers", "attn", "k", "kernel"): ("model.layers.{i}.self_attn.k_proj.weight", _to_kernel(_kv), _from_kernel),
    ("layers", "attn", "v", "kernel"): ("model.layers.{i}.self_attn.v_proj.weight", _to_kernel(_kv), _from_kernel),
    ("layers", "attn", "q", "bias"): ("model.layers.{i}.self_attn.q_proj.bias", _bias(_heads), _flat),
    ("layers", "attn", "k", "bias"): ("model.layers.{i}.self_attn.k_proj.bias", _bias(_kv), _flat),
    ("layers", "attn", "v", "bias"): ("model.layers.{i}.self_attn.v_proj.bias", _bias(_kv), _flat),
    ("layers", "attn", "o", "kernel"): ("model.layers.{i}.self_attn.o_proj.weight", _o_to_kernel, _o_from_kernel),
    ("layers", "attn", "o", "bias"): ("model.layers.{i}.self_attn.o_proj.bias", _same, _same),
    ("layers", "attn", "q_norm", "scale"): ("model.layers.{i}.self_attn.q_norm.weight", _same, _same),
    ("layers", "attn", "k_norm", "scale"): ("model.layers.{i}.self_attn.k_norm.weight", _same, _same),
    ("layers", "mlp", "gate", "kernel"): ("model.layers.{i}.mlp.gate_proj.weight", lambda w, c: w.T, lambda w: w.T),
    ("layers", "mlp", "up", "kernel"): ("model.layers.{i}.mlp.up_proj.weight", lambda w, c: w.T, lambda w: w.T),
    ("layers", "mlp", "down", "kernel"): ("model.layers.{i}.mlp.down_proj.weight", lambda w, c: w.T, lambda w: w.T),
    ("layers", "mlp", "gate", "bias"): ("model.layers.{i}.mlp.gate_proj.bias", _same, _same),
    ("layers", "mlp", "up", "bias"): ("model.layers.{i}.mlp.up_proj.bias", _same, _same),
    ("layers", "mlp", "down", "bias"): ("model.layers.{i}.mlp.down_proj.bias", _same, _same),
}


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def hf_to_param(source: Mapping[str, np.ndarray], config: DecoderConfig, path: tuple[str, ...],
                shape: tuple[int, ...], dtype) -> np.ndarray:
    """Returns the host array for our param at `path` (layer tensors stacked), checking names and shapes."""
    if path not in PARAM_TABLE:
        raise KeyError(f"no checkpoint mapping for parameter {'/'.join(path)}")
    hf_name, to_ours, _ = PARAM_TABLE[path]
    names = [hf_name.format(i=i) for i in range(config.num_layers)] if "{i}" in hf_name else [hf_name]
    missing = [n for n in names if n not in source]
    if missing:
        raise KeyError(f"checkpoint is missing tensor {missing[0]!r} (needed for parameter {'/'.join(path)}"
                       f"{f'; {len(missing)} missing in all' if len(missing) > 1 else ''})")
    arrays = []
    for n in names:
        w = to_ours(np.asarray(source[n], dtype=np.float32), config)
        want = shape[1:] if len(names) > 1 or "{i}" in hf_name else shape
        if tuple(w.shape) != tuple(want):
            raise ValueError(f"tensor {n!r} has shape {tuple(source[n].shape)}, which converts to {tuple(w.shape)}; "
                             f"parameter {'/'.join(path)} expects {tuple(want)} per layer")
        arrays.append(w)
    out = np.stack(arrays) if "{i}" in hf_name else arrays[0]
    return out.astype(dtype)


def expected_hf_names(params_shapes, config: DecoderConfig) -> set[str]:
    """Returns the HF tensor names that a param tree of this structure reads."""
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params_shapes)[0]:
        hf_name = PARAM_TABLE[_path_keys(path)][0]
        names.update(hf_name.format(i=i) for i in range(config.num_layers)) if "{i}" in hf_name else names.add(hf_name)
    return names


def params_to_hf(params, config: DecoderConfig) -> dict[str, np.ndarray]:
    """Returns {HF tensor name: NumPy array in torch layout} for a (host or device) param tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _path_keys(path)
        hf_name, _, to_hf = PARAM_TABLE[keys]
        w = np.asarray(jax.device_get(leaf))
        if "{i}" in hf_name:
            for i in range(config.num_layers):
                out[hf_name.format(i=i)] = np.ascontiguousarray(to_hf(w[i]))
        else:
            out[hf_name] = np.ascontiguousarray(to_hf(w))
    return out
