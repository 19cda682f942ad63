"""On-disk cache location and content fingerprints for converted artefacts (tokenizers, weights)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def cache_dir(*parts: str) -> Path:
    """Returns (and creates) `$RPOREC_CACHE_DIR/parts...` (default `~/.cache/rporec_jax`)."""
    root = Path(os.environ.get("RPOREC_CACHE_DIR", Path.home() / ".cache" / "rporec_jax"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_fingerprint(path: str | os.PathLike, extra: str = "") -> str:
    """Returns a short hex key of a file's resolved path, size, mtime and `extra` (cheap; no full read)."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{extra}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def save_array(path: Path, array: np.ndarray) -> None:
    """Writes `array` to `path` (.npy) atomically: a reader never sees a half-written cache entry."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
