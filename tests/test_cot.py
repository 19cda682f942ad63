"""Stage-1 CoT generation: completeness, resume after interruption, determinism, manifests, selection, format rate."""

import json
import os
import types

import jax
import numpy as np
import pytest

from rporec_jax import sharding as shd
from rporec_jax.data import DataConfig, PromptConfig, SplitConfig, SyntheticConfig, instruction_for, load_dataset
from rporec_jax.data.testing import tiny_chat_tokenizer
from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params, param_shardings
from rporec_jax.sampling import ForceFormat, Sampler
from rporec_jax.train.cot import (CoTConfig, completion_record, generate_cot, load_cot, load_teacher,
                                  model_fingerprint, record_stats, select_samples, shard_path, _prompt_mode)

SRC = SyntheticConfig(num_users=12, min_len=4, max_len=6, num_categories=4, items_per_category=4, seed=1)
# 38 train / 5 valid / 5 test instances; with shard_size 16 and batch 8: shards of 16, 16, 6 | 5 | 5, 7 batches.
# Two samples per instance everywhere: one compiled sampler serves every test (compiling dominates test time).
CFG = CoTConfig(num_samples=2, max_new_tokens=8, prompt_buckets=(256,), batch_size=8, shard_size=16, seed=0)
N_BATCHES = 7
VALID = "<think> likes lamps </think> so <answer> 'title': lamp </answer>"
BROKEN = ["<think> likes lamps </think> no answer", "<think></think><answer> lamp </answer>",
          "<think> a </think><think> b </think><answer> c </answer>", "<answer> lamp </answer>"]


def _tok(extra=(), whole_tags=False):
    data = SRC.load()
    return tiny_chat_tokenizer(data.item_texts + [instruction_for(data.name, PromptConfig()), PromptConfig().system,
                                                  *extra], whole_tags=whole_tags)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    cfg = DataConfig(source=SRC, split=SplitConfig(window=4), num_negatives=3)
    return load_dataset(cfg, tmp_path_factory.mktemp("datasets"), tokenizer=_tok())


def _model(tok, mesh):
    config = DecoderConfig("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    return Model(config, init_params(config, jax.random.key(3), mesh), tok, mesh=mesh)


@pytest.fixture(scope="module")
def model(mesh1):
    return _model(_tok(), mesh1)


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, CFG.sampling())


def _perturbed(model):
    return Model(model.config, jax.tree_util.tree_map(lambda x: x * 1.01, model.params), model.tokenizer,
                 mesh=model.mesh)


class Counting:
    """Wraps a sampler: counts generate calls and raises on call number `fail_at` (a crash mid-shard)."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.config, self.calls, self.fail_at = inner, inner.config, 0, fail_at

    def generate(self, prompts, key):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        return self.inner.generate(prompts, key)


class Crafted:
    """A fake sampler whose sample s of a prompt of length L is valid iff (L + s) % 3 == 0."""

    def __init__(self, config):
        self.config = config

    def generate(self, prompts, key):
        g = self.config.num_samples
        texts = [VALID if (len(p) + s) % 3 == 0 else BROKEN[(len(p) + s) % 4] for p in prompts for s in range(g)]
        return types.SimpleNamespace(texts=texts, lengths=np.full(len(texts), 5), stopped=np.ones(len(texts), bool))


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("shard-*.jsonl"))}


def _run(model, ds, out, cfg=CFG, sampler=None, **kw):
    return generate_cot(model, ds, out, cfg, sampler=sampler, progress=False, report=None, **kw)


def test_every_instance_gets_num_samples_completions(model, ds, sampler, tmp_path):
    stats = _run(model, ds, tmp_path, sampler=sampler)
    assert stats.complete and stats.shards_written == 5
    assert stats.completions_generated == 2 * 48 and stats.tokens_generated > 0
    for split in ("train", "valid", "test"):
        want = [r["index"] for r in ds.records(split)]
        got = load_cot(tmp_path, split, selection="all")
        assert sorted(got) == sorted(want)
        for index, samples in got.items():
            assert [r["sample"] for r in samples] == [0, 1] and all(r["index"] == index for r in samples)
            assert all(1 <= r["num_tokens"] <= 8 for r in samples)
        assert stats.splits[split]["completions"] == 2 * len(want)
        assert len(load_cot(tmp_path, split)) == len(want)  # first_valid keeps one per instance
        assert all(len(v) == 1 for v in load_cot(tmp_path, split).values())
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"shard-0000{k}.jsonl" for k in range(3)]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] == {"train": True, "valid": True, "test": True} and manifest["prompts"] == "stored"
    # stored prompts were used as-is: the recorded prompt length is the stored prompt's
    stored = {r["index"]: len(r["prompt_ids"]) for r in ds.records("valid")}
    assert {i: v[0]["prompt_tokens"] for i, v in load_cot(tmp_path, "valid").items()} == stored


def test_interrupt_then_resume_equals_uninterrupted_run(model, ds, sampler, tmp_path):
    full = Counting(sampler)
    _run(model, ds, tmp_path / "a", sampler=full)
    assert full.calls == N_BATCHES
    ref = _files(tmp_path / "a")
    assert len(ref) == 5

    b = tmp_path / "b"
    first = _run(model, ds, b, sampler=Counting(sampler), max_shards=2)  # a clean stop after two shards
    assert not first.complete and first.shards_written == 2
    assert sorted(_files(b)) == ["train/shard-00000.jsonl", "train/shard-00001.jsonl"]
    with pytest.raises(FileNotFoundError, match="1 of 3 shards missing .first: shard-00002.jsonl"):
        load_cot(b, "train")
    assert sum(len(v) for v in load_cot(b, "train", allow_partial=True, selection="all").values()) == 2 * 32
    mtimes = {p: os.stat(b / p).st_mtime_ns for p in _files(b)}

    crash = Counting(sampler, fail_at=2)  # dies inside the second batch of the run: valid's only batch is 2nd
    with pytest.raises(KeyboardInterrupt):
        _run(model, ds, b, sampler=crash)
    assert len(_files(b)) == 3  # train's last shard finished; the crashed valid shard left no shard file
    assert not shard_path(b, "valid", 0).exists()

    written = []
    resume = Counting(sampler)
    stats = _run(model, ds, b, sampler=resume, on_shard=lambda s, k: written.append((s, k)))
    assert written == [("valid", 0), ("test", 0)] and resume.calls == 2  # only the unfinished shards ran
    assert stats.complete and stats.shards_written == 2
    assert {p: os.stat(b / p).st_mtime_ns for p in mtimes} == mtimes  # finished shards never rewritten
    assert _files(b) == ref  # byte-identical to the uninterrupted run
    # the equality above is meaningful: another seed gives other completions
    other = CoTConfig(**{**CFG.__dict__, "seed": 1})
    _run(model, ds, tmp_path / "c", other, sampler=sampler)
    assert _files(tmp_path / "c") != ref
    # a finished run has nothing left to do
    again = Counting(sampler)
    assert _run(model, ds, b, sampler=again).shards_written == 0 and again.calls == 0


def test_config_or_model_mismatch_is_an_error(model, ds, sampler, tmp_path):
    _run(model, ds, tmp_path, sampler=sampler, max_shards=1)
    other = CoTConfig(**{**CFG.__dict__, "max_new_tokens": 9})
    with pytest.raises(ValueError, match=r"manifest.json: .*\(config.max_new_tokens: stored 8, now 9\); use a new"):
        _run(model, ds, tmp_path, other)
    with pytest.raises(ValueError, match=r"manifest.json: .*model_fingerprint"):
        _run(_perturbed(model), ds, tmp_path)
    # settings that do not change the completions may differ (reading selection, the subset of splits)
    ok = CoTConfig(**{**CFG.__dict__, "selection": "all", "splits": ("test",)})
    stats = _run(model, ds, tmp_path, ok, sampler=sampler)
    assert list(stats.splits) == ["test"] and stats.complete
    with pytest.raises(ValueError, match="sampler config"):
        _run(model, ds, tmp_path, other, sampler=sampler)
    with pytest.raises(ValueError, match="sampler was built for another model"):
        _run(_perturbed(model), ds, tmp_path, sampler=sampler)


def test_model_fingerprint_exact_and_sharding_independent(model, mesh1):
    fp = model_fingerprint(model)
    mesh8 = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4))
    host = jax.device_get(model.params)
    moved = Model(model.config, jax.device_put(host, param_shardings(model.config, mesh8, "fsdp")),
                  model.tokenizer, mesh=mesh8, strategy="fsdp")
    assert model_fingerprint(moved) == fp
    host["final_norm"]["scale"] = np.array(host["final_norm"]["scale"]).copy()
    host["final_norm"]["scale"][3] = np.nextafter(host["final_norm"]["scale"][3], np.float32(2))  # one ulp
    assert model_fingerprint(Model(model.config, host, model.tokenizer, mesh=mesh1)) != fp
    assert model_fingerprint(Model(model.config, model.params, _tok(["extra words"]), mesh=mesh1)) != fp
    assert load_teacher(CFG, model) is model


def test_selection_modes():
    rec = lambda i, s, t: completion_record(i, s, t, 5, True, 10)  # noqa: E731
    samples = [rec(0, 2, VALID), rec(0, 0, BROKEN[0]), rec(0, 1, VALID)]
    assert [r["sample"] for r in select_samples(samples, "first_valid")] == [1]
    assert [r["sample"] for r in select_samples(samples, "all")] == [0, 1, 2]
    assert [r["sample"] for r in select_samples([rec(1, 1, BROKEN[1]), rec(1, 0, BROKEN[2])], "first_valid")] == [0]
    with pytest.raises(ValueError, match="selection='best'"):
        select_samples(samples, "best")
    with pytest.raises(ValueError, match="CoTConfig.selection='best'"):
        CoTConfig(selection="best")


def test_format_rate_on_crafted_texts(model, ds, tmp_path):
    recs = [completion_record(0, 0, VALID, 5, True, 10)] + \
        [completion_record(i + 1, 0, t, 5, i != 0, 10) for i, t in enumerate(BROKEN)] + \
        [completion_record(1, 1, VALID, 7, True, 10)]
    assert [r["format_ok"] for r in recs] == [1, 0, 0, 0, 0, 1]
    assert recs[0]["cot"] == "likes lamps" and recs[0]["answer"] == "'title': lamp" and recs[0]["mid"] == " so "
    st = record_stats(recs)
    assert st["completions"] == 6 and st["valid"] == 2 and st["valid_rate"] == pytest.approx(2 / 6)
    assert st["instances"] == 5 and st["instance_valid_rate"] == pytest.approx(2 / 5)
    assert st["truncated"] == 1 and st["mean_tokens"] == pytest.approx(32 / 6)

    # end to end with a sampler of known outputs: rates and first_valid picks follow from the prompt lengths
    cfg = CoTConfig(**{**CFG.__dict__, "num_samples": 3})
    lines = []
    stats = generate_cot(model, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()), progress=False,
                         report=lines.append)
    lens = {s: [len(r["prompt_ids"]) for r in ds.records(s)] for s in ("train", "valid", "test")}
    for split, ls in lens.items():
        flags = [[(n + s) % 3 == 0 for s in range(3)] for n in ls]
        assert stats.splits[split]["valid_rate"] == pytest.approx(np.mean(flags))
        assert stats.splits[split]["instance_valid_rate"] == pytest.approx(np.mean([any(f) for f in flags]))
        picked = load_cot(tmp_path, split)
        for r, f in zip(ds.records(split), flags):
            (chosen,) = picked[r["index"]]
            assert chosen["sample"] == (f.index(True) if any(f) else 0)
    assert stats.valid_rate == pytest.approx(np.mean([(n + s) % 3 == 0 for ls in lens.values() for n in ls
                                                      for s in range(3)]))
    assert "format-valid" in lines[0] and f"{stats.splits['train']['valid_rate']:.1%}" in lines[0]


def test_prompts_reencoded_for_a_teacher_with_another_tokenizer(model, ds, mesh1, tmp_path):
    assert _prompt_mode(model, ds) == "stored"
    other = Model(model.config, model.params, _tok(["zebra"]), mesh=mesh1)  # runs only the Crafted sampler
    assert _prompt_mode(other, ds) == "teacher_tokenizer"
    cfg = CoTConfig(**{**CFG.__dict__, "splits": ("valid",), "num_samples": 1})
    _run(other, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()))
    builder = ds.prompt_builder(other.tokenizer)
    want = {r["index"]: len(builder.encode([r["history"]])[0][0]) for r in ds.records("valid")}
    assert {i: v[0]["prompt_tokens"] for i, v in load_cot(tmp_path, "valid").items()} == want


def test_corrupt_shard_is_reported_with_file_and_line(model, ds, tmp_path):
    cfg = CoTConfig(**{**CFG.__dict__, "splits": ("test",)})
    _run(model, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()))
    path = shard_path(tmp_path, "test", 0)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"index": 1}'] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"shard-00000.jsonl:3: record lacks fields \['sample'"):
        load_cot(tmp_path, "test")
    path.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_cot(tmp_path, "test")


def test_crash_while_writing_leaves_no_shard_and_is_regenerated(model, ds, tmp_path, monkeypatch):
    import rporec_jax.train.cot as cot

    cfg = CoTConfig(**{**CFG.__dict__, "splits": ("test",)})

    def boom(fd):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(cot.os, "fsync", boom)
        with pytest.raises(OSError, match="disk full"):
            _run(model, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()))
    assert not shard_path(tmp_path, "test", 0).exists()  # only the temporary file was written
    assert [p.name.startswith(".shard-00000.jsonl.tmp-") for p in (tmp_path / "test").iterdir()] == [True]
    written = []
    _run(model, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()), on_shard=lambda s, k: written.append(k))
    assert written == [0] and [p.name for p in (tmp_path / "test").iterdir()] == ["shard-00000.jsonl"]


def test_forced_format_makes_every_record_valid(ds, mesh1, tmp_path):
    model = _model(_tok(whole_tags=True), mesh1)  # the tags are tokens it can write
    cfg = CoTConfig(**{**CFG.__dict__, "splits": ("valid",), "num_samples": 1, "max_new_tokens": 14,
                       "assume_think_open": True, "force_format": ForceFormat(True, 6, 4)})
    stats = _run(model, ds, tmp_path, cfg)
    recs = [r for v in load_cot(tmp_path, "valid").values() for r in v]
    assert len(recs) == 5 and stats.splits["valid"]["valid_rate"] == 1.0
    assert all(r["cot"] and r["answer"] and r["stopped"] and r["num_tokens"] <= 14 for r in recs)
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["force_format"]["enabled"] is True


def test_manifest_from_before_force_format_still_matches(model, ds, tmp_path):
    cfg = CoTConfig(**{**CFG.__dict__, "splits": ("valid",), "num_samples": 1})
    _run(model, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()))
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["force_format"]  # as written before the setting existed: its default, off
    path.write_text(json.dumps(manifest))
    _run(model, ds, tmp_path, cfg, sampler=Crafted(cfg.sampling()))
    forced = CoTConfig(**{**cfg.__dict__, "assume_think_open": True, "force_format": ForceFormat(True, 2, 2)})
    with pytest.raises(ValueError, match=r"config.force_format: stored \{'enabled': False"):
        _run(model, ds, tmp_path, forced, sampler=Crafted(forced.sampling()))
