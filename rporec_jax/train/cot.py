"""Stage-1 CoT generation: the teacher's sampled completion(s) for every instance, written as resumable shards.

    teacher = load_teacher(CoTConfig(), backbone)            # the backbone itself unless cfg.teacher names a path
    stats = generate_cot(teacher, dataset, "runs/x/cot", CoTConfig(num_samples=1))
    cots = load_cot("runs/x/cot", "train")                   # {instance index: [record, ...]}

Layout of `out_dir`: `manifest.json` (config, model and dataset fingerprints, shard layout, stats) and
`{split}/shard-{k:05d}.jsonl`, one JSON line per completion, ordered by (instance index, sample index). Shard k of
a split holds the instances at stored positions [k * shard_size, (k + 1) * shard_size). A shard is written to a
temporary name and renamed when complete, so an existing shard file is always whole: a resumed run skips it.

Determinism: the key of batch b of shard k of split s is fold_in(fold_in(fold_in(key(seed), s), k), b), and every
batch is padded to `batch_size` rows (one compiled shape, the same random draws), so a run interrupted anywhere and
resumed writes byte-identical shards to an uninterrupted run on the same mesh batch size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rporec_jax import sharding as shd
from rporec_jax.data.parser import parse_output
from rporec_jax.data.prompts import tokenizer_fingerprint
from rporec_jax.data.splits import SPLITS
from rporec_jax.data.storage import PreparedDataset, decode, fingerprint as dataset_fingerprint
from rporec_jax.sampling import ForceFormat, Sampler, SamplingConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SELECTIONS = ("first_valid", "all")
# Settings that do not change what is generated: a run may differ from the stored manifest in these.
_NOT_COMPARED = ("splits", "selection", "teacher", "teacher_dtype")
RECORD_FIELDS = ("index", "sample", "text", "pre", "cot", "mid", "answer", "post", "format_ok", "num_tokens",
                 "stopped", "prompt_tokens")


@dataclasses.dataclass(frozen=True)
class CoTConfig:
    """CoT generation settings (reference: one sample per instance, top_p 0.95, T 1.0, <= 768 new tokens).

    `teacher`: model path (HF dir or .gguf) read by `load_model`; empty = the backbone itself.
    `batch_size` prompts per sampler call (every call is padded to it); `shard_size` instances per output file.
    `selection` is how `load_cot` picks among samples: 'first_valid' (first valid-format sample, else the first
    sample) or 'all'. `assume_think_open` parses completions as if they began with `<think>` (for chat templates
    whose generation prompt already ends in it). `stop_strings` are empty by default because the sampler drops
    the stop string from the text, and a completion cut at `</answer>` would lose its closing tag.
    `force_format`: budget forcing of the answer format (`rporec_jax.sampling.ForceFormat`; it prefills `<think>`,
    so it needs `assume_think_open`).
    """

    splits: tuple[str, ...] = SPLITS
    teacher: str = ""
    teacher_dtype: str = "bfloat16"
    num_samples: int = 1
    max_new_tokens: int = 768
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0
    prompt_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    stop_strings: tuple[str, ...] = ()
    assume_think_open: bool = False
    force_format: ForceFormat = ForceFormat()
    batch_size: int = 64
    shard_size: int = 1024
    selection: str = "first_valid"
    seed: int = 0

    def __post_init__(self):
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"CoTConfig.splits={self.splits}: expected a non-empty subset of {SPLITS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"CoTConfig.selection={self.selection!r}; expected one of {SELECTIONS}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(f"CoTConfig batch_size={self.batch_size}, shard_size={self.shard_size}; both must "
                             "be >= 1")
        self.sampling()  # validates the decoding settings now rather than at the first batch

    def sampling(self) -> SamplingConfig:
        """Returns the sampler settings these CoT settings imply."""
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, num_samples=self.num_samples, prompt_buckets=self.prompt_buckets,
                              stop_strings=self.stop_strings, force=self.force_format)


@dataclasses.dataclass
class CoTStats:
    """Outcome of a `generate_cot` call: per-split format statistics over everything on disk, and this run's work.

    `splits[s]` has instances, completions, valid (format_ok completions), valid_rate (valid / completions),
    instance_valid_rate (instances with at least one valid sample), truncated (completions that hit
    max_new_tokens), mean_tokens, shards_done, shards.
    """

    out_dir: Path
    splits: dict[str, dict[str, Any]]
    complete: bool
    shards_written: int
    completions_generated: int
    tokens_generated: int
    seconds: float

    @property
    def valid_rate(self) -> float:
        """Returns the format-valid rate over all completions on disk of the generated splits."""
        n = sum(s["completions"] for s in self.splits.values())
        return sum(s["valid"] for s in self.splits.values()) / n if n else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Returns generated completion tokens per second of this run."""
        return self.tokens_generated / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """Returns a multi-line human-readable report."""
        lines = [f"CoT {self.out_dir}: {'complete' if self.complete else 'INCOMPLETE'}; this run wrote "
                 f"{self.shards_written} shards, {self.completions_generated} completions, {self.tokens_generated} "
                 f"tokens in {self.seconds:.1f}s ({self.tokens_per_s:.1f} tok/s)"]
        for name, s in self.splits.items():
            lines.append(f"  {name}: {s['shards_done']}/{s['shards']} shards, {s['completions']} completions of "
                         f"{s['instances']} instances, format-valid {s['valid_rate']:.1%} (instances with a valid "
                         f"sample {s['instance_valid_rate']:.1%}), truncated {s['truncated']}, mean "
                         f"{s['mean_tokens']:.1f} tokens")
        return "\n".join(lines)


def load_teacher(cfg: CoTConfig, backbone):
    """Returns the teacher `Model`: `backbone` when `cfg.teacher` is empty, else the model at that path, loaded on
    the backbone's mesh and strategy."""
    if not cfg.teacher:
        return backbone
    from rporec_jax.models import load_model

    return load_model(cfg.teacher, dtype=cfg.teacher_dtype, mesh=backbone.mesh, strategy=backbone.strategy)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Returns two uint32 checksums of a leaf's bits; integer sums wrap exactly, so any sharding agrees."""
    size = x.dtype.itemsize
    if size in (1, 2, 4) and not jnp.issubdtype(x.dtype, jnp.bool_):
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
    else:
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    bits = bits.astype(jnp.uint32)
    # Position weights make the checksum sensitive to permutations, not just to the multiset of values. The flat
    # index is built from per-axis iotas rather than by flattening, which would regather a sharded leaf.
    flat = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        flat = flat + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    weights = flat * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


# Jitted once per process; retraced only for a new parameter tree structure.
_checksums = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def model_fingerprint(model) -> str:
    """Returns a hex digest of a model's architecture config, tokenizer and exact parameter bits."""
    h = hashlib.sha256()
    h.update(repr(dataclasses.asdict(model.config)).encode())
    h.update(tokenizer_fingerprint(model.tokenizer).encode() if model.tokenizer is not None else b"no-tokenizer")
    flat, _ = jax.tree_util.tree_flatten_with_path(model.params)
    sums = shd.to_host(_checksums([x for _, x in flat]))
    for (path, x), s in zip(flat, sums):
        h.update(f"{jax.tree_util.keystr(path)}|{x.shape}|{x.dtype}|{int(s[0])}|{int(s[1])}".encode())
    return h.hexdigest()


def completion_record(index: int, sample: int, text: str, num_tokens: int, stopped: bool, prompt_tokens: int,
                      assume_think_open: bool = False) -> dict:
    """Returns the stored record of one completion: ids, text, parsed fields, format flag and token counts."""
    p = parse_output(text, assume_think_open)
    return {"index": int(index), "sample": int(sample), "text": text, "pre": p.pre, "cot": p.cot, "mid": p.mid,
            "answer": p.answer, "post": p.post, "format_ok": int(p.format_ok), "num_tokens": int(num_tokens),
            "stopped": bool(stopped), "prompt_tokens": int(prompt_tokens)}


def record_stats(records: Iterable[dict]) -> dict[str, Any]:
    """Returns instances, completions, valid, valid_rate, instance_valid_rate, truncated, mean_tokens of records."""
    n = valid = truncated = tokens = 0
    per_instance: dict[int, bool] = {}
    for r in records:
        n += 1
        valid += r["format_ok"]
        truncated += not r["stopped"]
        tokens += r["num_tokens"]
        per_instance[r["index"]] = per_instance.get(r["index"], False) or bool(r["format_ok"])
    return {"instances": len(per_instance), "completions": n, "valid": valid, "valid_rate": valid / n if n else 0.0,
            "instance_valid_rate": sum(per_instance.values()) / len(per_instance) if per_instance else 0.0,
            "truncated": truncated, "mean_tokens": tokens / n if n else 0.0}


def select_samples(samples: list[dict], selection: str) -> list[dict]:
    """Returns the samples kept for one instance: all of them, or [first valid-format sample, else the first]."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; expected one of {SELECTIONS}")
    samples = sorted(samples, key=lambda r: r["sample"])
    if selection == "all" or not samples:
        return samples
    return [next((r for r in samples if r["format_ok"]), samples[0])]


def shard_path(out_dir: str | os.PathLike, split: str, shard: int) -> Path:
    """Returns the path of shard `shard` of `split` under `out_dir`."""
    return Path(out_dir) / split / f"shard-{shard:05d}.jsonl"


def batch_key(seed: int, split: str, shard: int, batch: int) -> jax.Array:
    """Returns the sampling key of one batch: a function of (seed, split, shard, batch) only, so resuming
    reproduces it."""
    key = jax.random.fold_in(jax.random.key(seed), SPLITS.index(split))
    return jax.random.fold_in(jax.random.fold_in(key, shard), batch)


def _compared(cfg: CoTConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps({k: v for k, v in d.items() if k not in _NOT_COMPARED}))


def write_json(path: Path, obj: Any) -> None:
    """Writes `obj` as JSON to `path` atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _prompt_mode(teacher, dataset: PreparedDataset) -> str:
    """Returns 'stored' when the dataset's prompt ids were made by the teacher's tokenizer, else 'teacher_tokenizer'
    (prompts are re-encoded from the same chat messages with the teacher's tokenizer and the same token budget)."""
    if teacher.tokenizer is None:
        raise ValueError("the teacher model has no tokenizer; CoT generation needs one with a chat template")
    if dataset.manifest.get("prompt_tokens") is None:  # prepared without a tokenizer: no stored prompt ids
        return "teacher_tokenizer"
    # The dataset fingerprint hashes its tokenizer; recomputing it with the teacher's tells whether they match.
    fp = dataset_fingerprint(dataset.config, dataset.manifest["inputs"], tokenizer_fingerprint(teacher.tokenizer))
    return "stored" if fp == dataset.manifest["fingerprint"] else "teacher_tokenizer"


def _open_manifest(out_dir: Path, cfg: CoTConfig, model_fp: str, dataset: PreparedDataset, prompts: str,
                   batch_multiple: int, writer: bool) -> dict:
    """Returns the run manifest, created if absent; raises if the stored one was made with other settings."""
    path = out_dir / MANIFEST
    want = {"format_version": FORMAT_VERSION, "config": _compared(cfg), "model_fingerprint": model_fp,
            "dataset_fingerprint": dataset.manifest["fingerprint"], "prompts": prompts}
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected a CoT manifest") from e
        diffs = []
        for k, v in want.items():
            if k == "config":
                # a manifest written before a setting existed (e.g. force_format) was made with its default
                old = {**_compared(CoTConfig()), **manifest.get("config", {})}
                diffs += [f"config.{c}: stored {old.get(c)!r}, now {v[c]!r}" for c in v if old.get(c) != v[c]]
            elif manifest.get(k) != v:
                diffs.append(f"{k}: stored {manifest.get(k)!r}, now {v!r}")
        if diffs:
            raise ValueError(f"{path}: this CoT directory was generated with different settings, and mixing outputs "
                             f"would corrupt it ({'; '.join(diffs)}); use a new output directory or delete this one")
        if manifest.get("batch_multiple") != batch_multiple:
            log.warning("%s: written with a mesh batch size of %s, now %s; the remaining shards are valid samples "
                        "but not bit-identical to an uninterrupted run", path, manifest.get("batch_multiple"),
                        batch_multiple)
        return manifest
    manifest = {**want, "full_config": json.loads(json.dumps(dataclasses.asdict(cfg))), "teacher": cfg.teacher,
                "dataset_path": str(dataset.path), "batch_multiple": batch_multiple, "splits": {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, manifest)
    return manifest


def _partial_path(out_dir: Path, split: str, shard: int) -> Path:
    path = shard_path(out_dir, split, shard)
    return path.with_name(f".{path.name}.partial")


def _read_partial(path: Path) -> tuple[int, list[dict]]:
    """Returns (batches done, their rows) of a shard stopped part-way, or (0, []) when there is none."""
    if not path.exists():
        return 0, []
    saved = json.loads(path.read_text())
    return int(saved["batches"]), list(saved["rows"])


def _shard_records(path: Path) -> list[dict]:
    """Returns the records of one shard file; raises naming the file and line when one is malformed."""
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e}); expected one completion record") from e
            missing = [k for k in RECORD_FIELDS if k not in rec]
            if missing:
                raise ValueError(f"{path}:{line_no}: record lacks fields {missing}; expected {list(RECORD_FIELDS)}")
            out.append(rec)
    return out


def generate_cot(teacher, dataset: PreparedDataset, out_dir: str | os.PathLike, cfg: CoTConfig = CoTConfig(), *,
                 sampler: Optional[Sampler] = None, max_shards: Optional[int] = None,
                 on_shard: Optional[Callable[[str, int], None]] = None, progress: bool = True,
                 report: Optional[Callable[[str], None]] = print,
                 should_stop: Optional[Callable[[], bool]] = None) -> CoTStats:
    """Returns `CoTStats` after generating every missing shard of `cfg.splits` into `out_dir` (resumes).

    `teacher` is a `Model` (see `load_teacher`). `sampler` reuses a built `Sampler` for `teacher` (its config must
    equal `cfg.sampling()`); `max_shards` stops after writing that many shards (the result says incomplete);
    `on_shard(split, shard)` runs after each shard is written; `report` receives the final summary (None = quiet).
    With several hosts, every host runs the sampler and host 0 writes; `out_dir` must be on a shared filesystem.
    `should_stop()` is polled before every batch: when it returns True, the batches of the current shard done so
    far are saved (`.<shard>.partial`) and `Stopped` is raised; a later call continues the shard after them, and
    the shard comes out byte-identical (each batch's key depends only on its position).
    """
    from rporec_jax.train.resume import Stopped
    out_dir = Path(out_dir)
    if sampler is None:
        sampler = Sampler(teacher, cfg.sampling())
    elif sampler.config != cfg.sampling():
        raise ValueError(f"sampler config {sampler.config} differs from CoTConfig.sampling() {cfg.sampling()}")
    elif getattr(sampler, "model", teacher) is not teacher:
        raise ValueError("the sampler was built for another model than `teacher`; the manifest would fingerprint "
                         "the wrong model")
    mesh = teacher.mesh or shd.make_mesh(devices=jax.devices()[:1])
    batch_multiple = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    if cfg.batch_size % batch_multiple:
        log.warning("batch_size %d is not a multiple of the mesh batch size %d; the sampler pads every batch",
                    cfg.batch_size, batch_multiple)
    writer = jax.process_index() == 0
    prompts_mode = _prompt_mode(teacher, dataset)
    manifest = _open_manifest(out_dir, cfg, model_fingerprint(teacher), dataset, prompts_mode, batch_multiple,
                              writer)
    builder = dataset.prompt_builder(teacher.tokenizer) if prompts_mode == "teacher_tokenizer" else None
    g = cfg.num_samples
    t0, written, n_completions, n_tokens, stopped_early = time.time(), 0, 0, 0, False

    for split in cfg.splits:
        src = dataset.source(split)
        n = len(src)
        n_shards = -(-n // cfg.shard_size)
        manifest["splits"][split] = {"instances": n, "shards": n_shards}
        todo = [k for k in range(n_shards) if not shard_path(out_dir, split, k).exists()]
        if max_shards is not None:  # the progress bar counts only what this call will generate
            todo = todo[:max(0, max_shards - written)]
        if writer:
            (out_dir / split).mkdir(parents=True, exist_ok=True)
            # Leftovers of a run that died while writing; one run writes a directory at a time.
            for stale in (out_dir / split).glob(".shard-*.jsonl.tmp-*"):
                stale.unlink()
            write_json(out_dir / MANIFEST, manifest)
        if not todo or stopped_early:
            continue
        remaining = sum(min(n, (k + 1) * cfg.shard_size) - k * cfg.shard_size for k in todo)
        bar = tqdm(total=remaining, desc=f"CoT {split}", unit="inst", disable=not progress, dynamic_ncols=True)
        valid_seen = seen = 0
        for k in todo:
            recs = [decode(src[i]) for i in range(k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size))]
            if builder is None:
                prompts = [r["prompt_ids"] for r in recs]
            else:
                prompts = [ids for ids, _ in builder.encode([r["history"] for r in recs])]
            # Similar lengths share a batch (less padding); a stable sort keeps the order reproducible.
            order = sorted(range(len(recs)), key=lambda i: len(prompts[i]))
            partial = _partial_path(out_dir, split, k)
            first, rows = _read_partial(partial)  # batches finished before a stop, and their rows
            bar.update(min(len(order), first * cfg.batch_size))
            n_batches = -(-len(order) // cfg.batch_size)
            for b, start in enumerate(range(0, len(order), cfg.batch_size)):
                if b < first:
                    continue
                if should_stop is not None and should_stop():
                    if writer:
                        write_json(partial, {"batches": b, "rows": rows})
                    raise Stopped(f"cot ({split} shard {k}) at batch {b + 1} of {n_batches}")
                idx = order[start : start + cfg.batch_size]
                batch = [prompts[i] for i in idx]
                # Every call has batch_size rows: one compiled shape, and draws independent of where a shard ends.
                batch += [batch[-1]] * (cfg.batch_size - len(batch))
                out = sampler.generate(batch, batch_key(cfg.seed, split, k, b))
                for j, i in enumerate(idx):
                    for s in range(g):
                        r = j * g + s
                        rows.append(completion_record(recs[i]["index"], s, out.texts[r], out.lengths[r],
                                                      out.stopped[r], len(prompts[i]), cfg.assume_think_open))
                        n_tokens += int(out.lengths[r])
                        valid_seen += rows[-1]["format_ok"]
                seen += len(idx) * g
                bar.update(len(idx))
                bar.set_postfix(valid=f"{valid_seen / seen:.1%}", refresh=False)
            rows.sort(key=lambda r: (r["index"], r["sample"]))
            n_completions += len(rows)
            if writer:
                path = shard_path(out_dir, split, k)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows)
                    f.flush()
                    os.fsync(f.fileno())
                # The rename is what marks the shard finished; a crash before it leaves only a temp file.
                os.replace(tmp, path)
                partial.unlink(missing_ok=True)
            written += 1
            if on_shard is not None:
                on_shard(split, k)
            if max_shards is not None and written >= max_shards:
                stopped_early = True
                break
        bar.close()

    stats = cot_stats(out_dir, cfg.splits)
    complete = all(s["shards_done"] == s["shards"] for s in stats.values())
    result = CoTStats(out_dir, stats, complete, written, n_completions, n_tokens, time.time() - t0)
    if writer:
        manifest["stats"] = stats
        manifest["complete"] = {s: v["shards_done"] == v["shards"] for s, v in stats.items()}
        write_json(out_dir / MANIFEST, manifest)
    if report is not None:
        report(result.summary())
    return result


def _read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; expected a CoT directory written by generate_cot")
    return json.loads(path.read_text())


def cot_stats(out_dir: str | os.PathLike, splits: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Returns per-split `record_stats` of the shards on disk plus shards_done and shards (expected)."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    out = {}
    for split in splits if splits is not None else manifest["splits"]:
        n_shards = manifest["splits"].get(split, {}).get("shards", 0)
        done = [k for k in range(n_shards) if shard_path(out_dir, split, k).exists()]
        recs = [r for k in done for r in _shard_records(shard_path(out_dir, split, k))]
        out[split] = {**record_stats(recs), "shards_done": len(done), "shards": n_shards}
    return out


def load_cot(out_dir: str | os.PathLike, split: str, selection: Optional[str] = None,
             allow_partial: bool = False) -> dict[int, list[dict]]:
    """Returns {instance index: [records]} of a split, samples chosen by `selection` (default: the manifest's).

    Raises when shards are missing (unless `allow_partial`), or when an instance's samples are duplicated or
    incomplete.
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"{out_dir / MANIFEST}: no split {split!r}; generated splits are {list(manifest['splits'])}")
    selection = selection or manifest["full_config"]["selection"]
    g = manifest["config"]["num_samples"]
    n_shards = manifest["splits"][split]["shards"]
    missing = [k for k in range(n_shards) if not shard_path(out_dir, split, k).exists()]
    if missing and not allow_partial:
        raise FileNotFoundError(f"{out_dir / split}: {len(missing)} of {n_shards} shards missing (first: "
                                f"{shard_path(out_dir, split, missing[0]).name}); resume generate_cot or pass "
                                "allow_partial=True")
    by_instance: dict[int, list[dict]] = {}
    for k in range(n_shards):
        path = shard_path(out_dir, split, k)
        if k in missing:
            continue
        for rec in _shard_records(path):
            samples = by_instance.setdefault(rec["index"], [])
            if any(r["sample"] == rec["sample"] for r in samples):
                raise ValueError(f"{path}: instance {rec['index']} sample {rec['sample']} appears twice; expected "
                                 "each (instance, sample) once")
            samples.append(rec)
    for index, samples in by_instance.items():
        if len(samples) != g:
            raise ValueError(f"{out_dir / split}: instance {index} has {len(samples)} samples; expected {g}")
    return {i: select_samples(s, selection) for i, s in sorted(by_instance.items())}
