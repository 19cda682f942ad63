"""Inputs of the `hidden_state` Rechead: the frozen LLM's final hidden state at the last token of a text.

User rows read prompt + completion (so the state sits at the end of the answer); item rows read each item's
text, so users and items live in the same LLM space before the Rechead's trainable projections.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import jax
import numpy as np

from rporec_jax import sharding as shd
from rporec_jax.cache import cache_dir, save_array


def last_hidden_states(model, token_lists: Sequence[Sequence[int]], batch_size: int = 16,
                       buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048), progress: bool = True) -> np.ndarray:
    """Returns float32 `[len(token_lists), hidden]`: the final-norm hidden state at each sequence's last token.

    Sequences are left-padded to the smallest bucket that holds the longest one in its batch, so the last
    position is always the last real token and a run compiles at most one program per bucket.
    """
    from tqdm.auto import tqdm

    mesh = model.mesh or shd.make_mesh(devices=jax.devices()[:1])
    multiple = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    batch_size = -(-batch_size // multiple) * multiple
    fwd = jax.jit(lambda p, t, m: model.forward(p, t, mask=m, compute_logits=False).hidden[:, -1])
    order = np.argsort([len(t) for t in token_lists], kind="stable")  # similar lengths share a bucket
    out = np.zeros((len(token_lists), model.config.hidden_size), np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="LLM hidden states", disable=not progress):
        idx = order[start:start + batch_size]
        longest = max(len(token_lists[i]) for i in idx)
        width = next((b for b in buckets if b >= longest), None)
        if width is None:
            raise ValueError(f"sequence {int(idx[-1])} has {longest} tokens, over the largest bucket {buckets[-1]}")
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        mask[:, -1] = True  # filler rows hold one token so every row is well defined
        for row, i in enumerate(idx):
            seq = token_lists[i]
            if not len(seq):
                raise ValueError(f"sequence {int(i)} is empty")
            tokens[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = True
        out[idx] = np.asarray(fwd(model.params, tokens, mask))[:len(idx)]
    return out


def user_token_lists(ds, split: str, model, cot: Optional[dict] = None, limit: Optional[int] = None):
    """Returns per-instance token ids of `split`: the chat prompt plus, with `cot`, the first completion text."""
    tok = model.tokenizer
    builder = ds.prompt_builder(tok)
    out = []
    for k, rec in enumerate(ds.records(split)):
        if limit is not None and k >= limit:
            break
        ids = rec.get("prompt_ids") or builder.encode([[h for h in rec["history"] if h]])[0][0]
        samples = (cot or {}).get(rec["index"], [])
        if samples:
            ids = list(ids) + tok(samples[0]["text"], add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    return out


def item_hidden_matrix(model, item_texts: Sequence[str], batch_size: int = 32, use_cache: bool = True) -> np.ndarray:
    """Returns `[items + 1, hidden]` LLM states of every item text (row 0, padding, is zero), cached under
    `$RPOREC_CACHE_DIR/item_hidden/<model fingerprint + texts>.npy`: the frozen backbone's item states do not
    depend on the seed, and a catalogue takes minutes on a CPU."""
    from rporec_jax.train.cot import model_fingerprint

    path = None
    if use_cache:
        h = hashlib.sha256(model_fingerprint(model).encode())
        for t in item_texts[1:]:
            h.update(t.encode() + b"\0")
        path = cache_dir("item_hidden") / f"{h.hexdigest()[:20]}.npy"
        if path.exists():
            return np.load(path)
    tok = model.tokenizer
    lists = [tok(t, add_special_tokens=False)["input_ids"][:1024] or [tok.eos_token_id] for t in item_texts[1:]]
    states = last_hidden_states(model, lists, batch_size)
    out = np.concatenate([np.zeros((1, states.shape[1]), np.float32), states])
    if path is not None and jax.process_index() == 0:
        save_array(path, out)
    return out


def hidden_examples(ds, split: str, model, cot: Optional[dict] = None, limit: Optional[int] = None) -> dict:
    """Returns {hidden [n, D], target [n], negatives [n, K], history [n, W], index [n]} for `split`."""
    lists = user_token_lists(ds, split, model, cot, limit)
    recs = [r for k, r in zip(range(len(lists)), ds.records(split))]
    width = max((len(r["history"]) for r in recs), default=0)
    return {"hidden": last_hidden_states(model, lists),
            "target": np.asarray([r["target"] for r in recs], np.int32),
            "negatives": np.asarray([r.get("negatives", []) for r in recs], np.int32).reshape(len(recs), -1),
            "history": np.asarray([list(r["history"]) + [0] * (width - len(r["history"])) for r in recs], np.int32),
            "index": np.asarray([r["index"] for r in recs], np.int64)}
