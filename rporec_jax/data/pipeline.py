"""grain pipelines over prepared splits: shuffled epochs, process sharding, bucketed padding, resumable state."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rporec_jax.data.negatives import instance_rng, sample_negatives
from rporec_jax.data.storage import PreparedDataset, decode


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Batching and ordering of one split. `batch_size` is per JAX process.

    Training: shuffle=True, drop_remainder=True, num_epochs=None (endless) or a count.
    Evaluation: shuffle=False, drop_remainder=False (the last batch is padded; `valid` marks real rows).
    `length_buckets` bound the distinct prompt shapes (and so jit recompilations).
    """

    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1
    drop_remainder: bool = True
    length_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)
    pad_id: int = 0
    pad_side: str = "left"
    resample_negatives: bool = False

    def __post_init__(self):
        if self.pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right', got {self.pad_side!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Returns the smallest bucket >= n (or n rounded up to a multiple of the largest bucket)."""
    for b in sorted(buckets):
        if n <= b:
            return b
    top = max(buckets)
    return -(-n // top) * top


class _Collate:
    """Stacks records into a batch of numpy arrays (a class, not a closure, so grain workers can pickle it)."""

    def __init__(self, window: int, cfg: LoaderConfig):
        self.window, self.cfg = window, cfg

    def __call__(self, rows: Sequence[tuple[dict, bool]]) -> dict:
        cfg, b = self.cfg, self.cfg.batch_size
        recs = [r for r, _ in rows]
        valid = [v for _, v in rows]
        if not cfg.drop_remainder and len(recs) < b:
            # Fixed batch shapes for jit: pad with copies of the first row marked invalid.
            recs += [recs[0]] * (b - len(recs))
            valid += [False] * (b - len(valid))
        n = len(recs)
        out = {
            "index": np.asarray([r["index"] for r in recs], np.int64),
            "user": np.asarray([r["user"] for r in recs], np.int32),
            "target": np.asarray([r["target"] for r in recs], np.int32),
            "timestamp": np.asarray([r["timestamp"] for r in recs], np.int64),
            "valid": np.asarray(valid, bool),
            "history": np.zeros((n, self.window), np.int32),
            "history_len": np.asarray([len(r["history"]) for r in recs], np.int32),
        }
        for i, r in enumerate(recs):
            out["history"][i, : len(r["history"])] = r["history"]
        if "negatives" in recs[0]:
            out["negatives"] = np.asarray([r["negatives"] for r in recs], np.int32)
        if "prompt_ids" in recs[0]:
            length = bucket_length(max(len(r["prompt_ids"]) for r in recs), cfg.length_buckets)
            ids = np.full((n, length), cfg.pad_id, np.int32)
            mask = np.zeros((n, length), bool)
            for i, r in enumerate(recs):
                x = r["prompt_ids"]
                sl = slice(length - len(x), length) if cfg.pad_side == "left" else slice(0, len(x))
                ids[i, sl], mask[i, sl] = x, True
            out["prompt_ids"], out["prompt_mask"] = ids, mask
        return out


class _Decode:
    def __call__(self, raw: bytes) -> tuple[dict, bool]:
        return decode(raw), True


class _Resample:
    """Draws fresh negatives from (seed, epoch-position index) so every epoch differs yet resumes exactly."""

    def __init__(self, num_items: int, k: int, seed: int):
        self.num_items, self.k, self.seed = num_items, k, seed

    def __call__(self, i: int, row: tuple[dict, bool]) -> tuple[dict, bool]:
        rec, valid = row
        rec = dict(rec, negatives=sample_negatives(instance_rng(self.seed, i), self.num_items, rec["target"],
                                                   self.k).tolist())
        return rec, valid


class _Strided:
    """Record j of this process is global record offset + j * count; past the end it repeats record 0, invalid."""

    def __init__(self, src, offset: int, count: int, length: int):
        self.src, self.offset, self.count, self.length = src, offset, count, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> tuple[dict, bool]:
        g = self.offset + j * self.count
        return (decode(self.src[g]), True) if g < len(self.src) else (decode(self.src[0]), False)


def make_loader(ds: PreparedDataset, split: str, cfg: LoaderConfig, process_index: int | None = None,
                process_count: int | None = None):
    """Returns a grain `DatasetIterator` of batches (dicts of numpy arrays, see `_Collate`) for this process.

    Batch fields: index [B], user [B], target [B], timestamp [B], valid [B], history [B, W], history_len [B],
    negatives [B, K] (if stored or resampled), prompt_ids / prompt_mask [B, L] with L a length bucket (if stored).
    Every process sees a disjoint share and the same number of batches. `it.get_state()` / `it.set_state()`
    checkpoint and restore the position; a restored iterator continues with exactly the next batch.
    """
    import grain
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} not in [0, {pc})")
    src = ds.source(split)
    n = len(src)
    if cfg.drop_remainder:
        # Equal shares per process so that no host waits on a batch another host never produces.
        per = n // pc
        if per < cfg.batch_size:
            raise ValueError(f"{ds.path} {split}: {n} records give {per} per process, fewer than batch_size "
                             f"{cfg.batch_size} (set drop_remainder=False or a smaller batch)")
        dset = grain.MapDataset.source(src).map(_Decode())
        if cfg.shuffle:
            dset = dset.shuffle(seed=cfg.seed)
        dset = dset[: per * pc][pi::pc]
    else:
        per = -(-n // pc)
        dset = grain.MapDataset.source(_Strided(src, pi, pc, per))
        if cfg.shuffle:
            dset = dset.shuffle(seed=cfg.seed)
    dset = dset.repeat(cfg.num_epochs)
    if cfg.resample_negatives:
        k = ds.config.num_negatives or 49
        dset = dset.map_with_index(_Resample(ds.num_items, k, cfg.seed * 1_000_003 + pi))
    window = ds.config.split.window
    dset = dset.batch(cfg.batch_size, drop_remainder=cfg.drop_remainder, batch_fn=_Collate(window, cfg))
    return iter(dset.to_iter_dataset())


def whole_split_loader(ds: PreparedDataset, split: str, batch_size: int):
    """Returns batches of all of `split` in order on every process (no shuffle, last batch padded with
    valid=False): evaluation reads identical host batches everywhere and splits them over the mesh itself."""
    return make_loader(ds, split, LoaderConfig(batch_size=batch_size, shuffle=False, drop_remainder=False),
                       process_index=0, process_count=1)
