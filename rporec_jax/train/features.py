"""Stage-1 inputs: dataset records + CoT completions -> tower-tokenized Rechead examples, and the frozen
item matrix (item texts through the frozen tower, cached on disk by a checksum of tower and texts)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from rporec_jax.cache import cache_dir, save_array

log = logging.getLogger(__name__)

# Reference-sized caps (tower tokens): the prompt holds up to 20 item descriptions.
DEFAULT_MAX_LENS = {"prompt": 512, "cot": 256, "answer": 128}


def rechead_examples(ds, split: str, encoder, cot: Optional[dict] = None,
                     max_lens: dict = DEFAULT_MAX_LENS, limit: Optional[int] = None) -> dict:
    """Returns {name: array [n, ...]} for `split`: prompt/cot/answer ids+mask (tower tokens), format [n],
    target [n], negatives [n, K], history [n, W], index [n]. `cot` maps instance index -> list of CoT
    records (from `rporec_jax.train.cot.load_cot`); without it CoT/answer are empty and format is 0."""
    builder = ds.prompt_builder()
    prompts, cots, answers, fmt, target, negatives, history, index = [], [], [], [], [], [], [], []
    missing = 0
    for k, rec in enumerate(ds.records(split)):
        if limit is not None and k >= limit:
            break
        hist = [h for h in rec["history"] if h]
        prompts.append(builder.user_content(hist))
        samples = (cot or {}).get(rec["index"], [])
        if cot is not None and not samples:
            missing += 1
        first = samples[0] if samples else {}
        cots.append(first.get("cot", ""))
        answers.append(first.get("answer", ""))
        fmt.append(int(first.get("format_ok", 0)))
        target.append(rec["target"])
        negatives.append(rec.get("negatives", []))
        history.append(rec["history"])
        index.append(rec["index"])
    if missing:
        raise ValueError(f"{split}: {missing} instances have no CoT completion; generate them first "
                         f"(rporec_jax.train.cot) or pass cot=None for a prompt-only head")
    out = {}
    for name, texts in (("prompt", prompts), ("cot", cots), ("answer", answers)):
        ids, mask, n_trunc = encoder.tokenize(texts, max_len=max_lens[name], return_truncated=True)
        if n_trunc:
            log.info("%s %s: %d of %d texts truncated to %d tower tokens", split, name, n_trunc, len(texts),
                     max_lens[name])
        out[f"{name}_ids"], out[f"{name}_mask"] = ids, mask
    width = max((len(h) for h in history), default=0)
    out.update(format=np.asarray(fmt, np.int32), target=np.asarray(target, np.int32),
               negatives=np.asarray(negatives, np.int32).reshape(len(target), -1),
               history=np.asarray([list(h) + [0] * (width - len(h)) for h in history], np.int32),
               index=np.asarray(index, np.int64))
    return out


def _fingerprint(encoder, texts: Sequence[str], max_len: int) -> str:
    h = hashlib.sha256(repr((encoder.config, max_len)).encode())
    for leaf in jax.tree_util.tree_leaves(jax.device_get(encoder.params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def item_matrix(encoder, item_texts: Sequence[str], max_len: int = 256, batch_size: int = 256,
                use_cache: bool = True) -> np.ndarray:
    """Returns the frozen item matrix `[items + 1, dim]` (row 0, padding, is zero) of `item_texts`
    (index 0 unused), cached under `$RPOREC_CACHE_DIR/item_matrix/<checksum of tower + texts>.npy`."""
    from rporec_jax.models.text_encoder import encode_texts

    texts = list(item_texts[1:])
    path: Optional[Path] = None
    if use_cache:
        path = cache_dir("item_matrix") / f"{_fingerprint(encoder, texts, max_len)}.npy"
        if path.exists():
            return np.load(path)
    vecs = encode_texts(encoder, texts, batch_size=batch_size, max_len=max_len)
    out = np.concatenate([np.zeros((1, vecs.shape[1]), np.float32), vecs.astype(np.float32)])
    if path is not None:
        save_array(path, out)
    return out
