"""Prepared datasets on disk: one directory per (inputs, config) with ArrayRecord shards, item table, manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import ClassVar, Iterator


from rporec_jax.data.interactions import interaction_stats, _quantiles
from rporec_jax.data.negatives import instance_rng, sample_negatives
from rporec_jax.data.ranges import Range, check_ranges
from rporec_jax.data.prompts import PromptBuilder, PromptConfig, instruction_for, tokenizer_fingerprint
from rporec_jax.data.sources import SOURCES, SourceConfig, SyntheticConfig
from rporec_jax.data.sources._io import OWNER, file_digest, owned_tmp_dir, remove_stale_tmp_dirs, verify_download
from rporec_jax.data.splits import SPLITS, SplitConfig, instance_stats, make_instances

# 2: split records stored users-interleaved (`Instances.select`); 3: MovieLens/Amazon configs gain `duplicates`
# (which the fingerprint hashes), inputs record their download URL.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ITEMS = "items.jsonl"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that determines a prepared dataset (the output directory is keyed by its fingerprint).

    `tokenizer` is a path (HF dir or .gguf) whose chat template renders prompts; empty = no prompt tokens stored.
    `num_negatives` fixed negatives are stored per instance (the loader can resample them per epoch instead).
    """

    source: SourceConfig = SyntheticConfig()
    split: SplitConfig = SplitConfig()
    prompt: PromptConfig = PromptConfig()
    tokenizer: str = ""
    num_negatives: int = 49
    seed: int = 0
    records_per_shard: int = 100_000

    RANGES: ClassVar[dict[str, Range]] = {
        "num_negatives": Range(0, note="0 = none stored"), "seed": Range(0), "records_per_shard": Range(1),
    }

    def __post_init__(self):
        check_ranges(self)


def config_to_dict(cfg: DataConfig) -> dict:
    """Returns a JSON-serialisable dict of `cfg` with the source kind named."""
    kind = next(k for k, c in SOURCES.items() if isinstance(cfg.source, c))
    d = dataclasses.asdict(cfg)
    d["source"] = {"kind": kind, **d["source"]}
    d["split"]["ratios"] = list(d["split"]["ratios"])
    return d


def config_from_dict(d: dict) -> DataConfig:
    """Returns the `DataConfig` that `config_to_dict` serialised."""
    src = dict(d["source"])
    kind = src.pop("kind")
    split = dict(d["split"])
    split["ratios"] = tuple(split["ratios"])
    return DataConfig(
        source=SOURCES[kind](**src), split=SplitConfig(**split), prompt=PromptConfig(**d["prompt"]),
        **{k: v for k, v in d.items() if k not in ("source", "split", "prompt")},
    )


def fingerprint(cfg: DataConfig, inputs: list[dict], tokenizer_fp: str) -> str:
    """Returns the hex key of a prepared dataset: config, input file checksums and tokenizer."""
    key = json.dumps({"v": FORMAT_VERSION, "config": config_to_dict(cfg), "inputs": [i["sha256"] for i in inputs],
                      "tokenizer": tokenizer_fp}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def default_root() -> Path:
    """Returns `$RPOREC_DATASETS_DIR`, else `<rporec cache>/datasets`."""
    if env := os.environ.get("RPOREC_DATASETS_DIR"):
        return Path(env)
    from rporec_jax.cache import cache_dir

    return cache_dir("datasets")


def prepare_dataset(cfg: DataConfig, out_root: str | os.PathLike | None = None, tokenizer=None,
                    log=None) -> Path:
    """Returns the directory of the prepared dataset for `cfg`, writing it only if no complete one exists.

    `tokenizer` overrides loading `cfg.tokenizer` (tests pass in-memory tokenizers; the fingerprint hashes the
    tokenizer's contents either way). Input files that were downloaded must still match the size and sha256
    recorded then. The directory is built under a temporary name and renamed when complete; temporary
    directories of killed prepares are removed first, even on reuse (those of live ones are left alone).
    """
    log = log or (lambda msg: None)
    root = Path(out_root) if out_root is not None else default_root()
    remove_stale_tmp_dirs(root, ".tmp-*", log)
    inputs = []
    for p in cfg.source.files():
        size, digest = p.stat().st_size, file_digest(p)
        rec = verify_download(p, size, digest)
        inputs.append({"path": str(p), "bytes": size, "sha256": digest, **({"url": rec["url"]} if rec else {})})
    if tokenizer is None and cfg.tokenizer:
        from rporec_jax.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    tok_fp = tokenizer_fingerprint(tokenizer) if tokenizer is not None else ""
    fp = fingerprint(cfg, inputs, tok_fp)
    final = root / f"{cfg.source.name}-{cfg.split.kind}-{fp[:12]}"
    if (final / MANIFEST).exists():
        log(f"reusing {final}")
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = owned_tmp_dir(root, f".tmp-{final.name}")
    try:
        _write(cfg, tmp, inputs, fp, tokenizer, log)
        (tmp / OWNER).unlink()
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).exists():
                raise
            # Another process finished the same dataset first; its copy is identical.
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {final}")
    return final


def _write(cfg: DataConfig, out: Path, inputs: list[dict], fp: str, tokenizer, log) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    t0 = time.time()
    data = cfg.source.load()
    inst = make_instances(data, cfg.split)
    counts = {s: len(inst.select(s)) for s in SPLITS}
    if not all(counts.values()):
        # Every stage reads every split; an empty one would fail much later, far from its cause.
        raise ValueError(f"{', '.join(i['path'] for i in inputs) or data.name}: {data.num_users} users with "
                         f"{data.num_interactions} interactions give {counts} instances under the "
                         f"{cfg.split.kind} split; every split needs at least one (a user gives one instance per "
                         f"interaction after the first)")
    dups, dropped = data.report.duplicate_rows, getattr(cfg.source, "duplicates", "keep") == "drop"
    dup_note = f", {dups} duplicate interaction rows {'dropped' if dropped else 'kept'}" if dups else ""
    log(f"loaded {data.name}: {data.num_users} users, {data.num_items} items, {len(inst)} instances{dup_note} "
        f"({time.time() - t0:.1f}s)")
    with open(out / ITEMS, "w") as f:
        for i, (k, t) in enumerate(zip(data.item_keys, data.item_texts)):
            f.write(json.dumps({"id": i, "key": k, "text": t}) + "\n")
    builder = None
    if tokenizer is not None:
        builder = PromptBuilder(data.item_texts, instruction_for(data.name, cfg.prompt), cfg.prompt, tokenizer)
    shards, truncation, prompt_lens = {}, {}, {}
    for s_i, split in enumerate(SPLITS):
        idx = inst.select(split)
        n_shards = max(1, -(-len(idx) // cfg.records_per_shard))
        names = [f"{split}.array_record-{k:05d}-of-{n_shards:05d}" for k in range(n_shards)]
        shards[split] = names
        lens, n_trunc, n_dropped = [], 0, 0
        for k, name in enumerate(names):
            part = idx[k * cfg.records_per_shard : (k + 1) * cfg.records_per_shard]
            writer = ArrayRecordWriter(str(out / name), "group_size:1")
            for start in range(0, len(part), 1024):
                chunk = part[start : start + 1024]
                hists = [inst.history[j, : inst.history_len[j]] for j in chunk]
                enc = builder.encode(hists) if builder is not None else None
                if cfg.num_negatives:
                    # One generator per (seed, split, chunk): reproducible without a per-record generator.
                    negs = sample_negatives(instance_rng(cfg.seed, s_i, k, start), data.num_items,
                                            inst.target[chunk], cfg.num_negatives).tolist()
                for c, j in enumerate(chunk):
                    rec = {
                        "index": int(k * cfg.records_per_shard + start + c),
                        "user": int(inst.user[j]),
                        "position": int(inst.position[j]),
                        "history": hists[c].tolist(),
                        "target": int(inst.target[j]),
                        "timestamp": int(inst.timestamp[j]),
                    }
                    if cfg.num_negatives:
                        rec["negatives"] = negs[c]
                    if enc is not None:
                        ids, dropped = enc[c]
                        rec["prompt_ids"], rec["history_dropped"] = ids, dropped
                        lens.append(len(ids))
                        n_trunc += dropped > 0
                        n_dropped += dropped
                    writer.write(json.dumps(rec, separators=(",", ":")).encode())
            writer.close()
        truncation[split] = {"prompts_truncated": int(n_trunc), "history_items_dropped": int(n_dropped)}
        prompt_lens[split] = _quantiles(lens)
        log(f"{split}: {len(idx)} records, {n_trunc} prompts truncated ({time.time() - t0:.1f}s)")
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "name": data.name,
        "config": config_to_dict(cfg),
        "inputs": inputs,
        "tokenizer": cfg.tokenizer,
        "instruction": builder.instruction if builder else instruction_for(data.name, cfg.prompt),
        # Users with a single interaction yield no instance; reported, not silently lost.
        "stats": {**interaction_stats(data), "users_without_instances": sum(len(q) < 2 for q in data.sequences),
                  "splits": instance_stats(inst)},
        "prompt_tokens": prompt_lens if builder else None,
        "truncation": truncation if builder else None,
        "rows": data.report.to_dict(),
        "source_extra": {k: v for k, v in data.extra.items() if isinstance(v, (str, int, float))},
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    # Written last: its presence is what marks the directory complete.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


@dataclasses.dataclass
class PreparedDataset:
    """A prepared dataset directory: manifest, item table and per-split ArrayRecord sources."""

    path: Path
    manifest: dict
    item_keys: list[str]
    item_texts: list[str]

    @property
    def num_items(self) -> int:
        """Returns N (real items are 1..N; 0 is padding)."""
        return len(self.item_texts) - 1

    @property
    def config(self) -> DataConfig:
        """Returns the `DataConfig` the dataset was prepared with."""
        return config_from_dict(self.manifest["config"])

    def source(self, split: str):
        """Returns a grain `ArrayRecordDataSource` of the split's serialized records (decode with `decode`)."""
        import grain

        if split not in self.manifest["shards"]:
            raise KeyError(f"{self.path}: no split {split!r}; has {list(self.manifest['shards'])}")
        return grain.sources.ArrayRecordDataSource([str(self.path / n) for n in self.manifest["shards"][split]])

    def records(self, split: str, chunk: int = 8192) -> Iterator[dict]:
        """Returns an iterator over the split's decoded records in stored order."""
        src = self.source(split)
        # Batched reads: one random-access read per record is ~20x slower on ArrayRecord.
        for start in range(0, len(src), chunk):
            for raw in src.__getitems__(list(range(start, min(start + chunk, len(src))))):
                yield decode(raw)

    def prompt_builder(self, tokenizer=None) -> PromptBuilder:
        """Returns the `PromptBuilder` (same instruction and limits) that produced the stored prompts."""
        cfg = self.config
        return PromptBuilder(self.item_texts, self.manifest["instruction"], cfg.prompt, tokenizer)


def decode(raw: bytes) -> dict:
    """Returns a record dict (index, user, position, history, target, timestamp[, negatives, prompt_ids, ...])."""
    return json.loads(raw)


def open_dataset(path: str | os.PathLike) -> PreparedDataset:
    """Returns the `PreparedDataset` at `path`; raises if the directory is not a complete prepared dataset."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"{path}: no {MANIFEST}; not a (complete) prepared dataset")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / MANIFEST}: format_version {manifest.get('format_version')}, "
                         f"this code reads {FORMAT_VERSION}; prepare the dataset again")
    keys, texts = [], []
    with open(path / ITEMS) as f:
        for line in f:
            row = json.loads(line)
            keys.append(row["key"])
            texts.append(row["text"])
    return PreparedDataset(path, manifest, keys, texts)


def load_dataset(cfg: DataConfig, out_root: str | os.PathLike | None = None, tokenizer=None) -> PreparedDataset:
    """Returns the prepared dataset for `cfg`, preparing it first if needed."""
    return open_dataset(prepare_dataset(cfg, out_root, tokenizer))
