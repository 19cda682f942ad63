"""Writing a param dict as .safetensors (bfloat16 included), sharded with an HF index when large."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPE_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` to one .safetensors file (the numpy backend of `safetensors` rejects bfloat16)."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        if arr.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _DTYPE_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def write_sharded(out_dir: str | os.PathLike, tensors: Mapping[str, np.ndarray], max_shard_bytes: int = 4 << 30):
    """Writes `model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when over `max_shard_bytes`."""
    out_dir = Path(out_dir)
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0])
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / fname, shard)
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
