"""HF tokenizer (with chat template) for a model directory or a GGUF file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from rporec_jax.cache import cache_dir, file_fingerprint


def load_tokenizer(path: str | os.PathLike):
    """Returns the `transformers` tokenizer of an HF model directory or a `.gguf` file.

    Converting a GGUF vocabulary takes ~10 s, so the converted tokenizer is cached
    (`$RPOREC_CACHE_DIR/tokenizers/<fingerprint>`) and later loads take well under a second.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source {path} does not exist (expected an HF model dir or a .gguf file)")
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: expected an HF model directory or a .gguf file")
    cached = cache_dir("tokenizers") / file_fingerprint(path, "tokenizer-v1")
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    if cached.exists():  # another process finished first; keep its copy
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, cached)
    return AutoTokenizer.from_pretrained(str(cached))
