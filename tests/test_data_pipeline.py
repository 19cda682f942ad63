"""Prepared dataset directories (ArrayRecord + manifest) and grain loaders (shuffle, shards, buckets, resume)."""

import json
import os

import numpy as np
import pytest

from rporec_jax.data import (DataConfig, LoaderConfig, PromptConfig, SplitConfig, SyntheticConfig, bucket_length,
                             instruction_for, load_dataset, make_loader, open_dataset, prepare_dataset)
from rporec_jax.data.__main__ import main as cli_main
from rporec_jax.data.testing import tiny_chat_tokenizer

SRC = SyntheticConfig(num_users=120, seed=2)
CFG = DataConfig(source=SRC, split=SplitConfig(window=8), prompt=PromptConfig(max_prompt_tokens=160),
                 num_negatives=5)


@pytest.fixture(scope="module")
def tok():
    data = SRC.load()
    return tiny_chat_tokenizer(data.item_texts + [instruction_for(data.name, PromptConfig()), PromptConfig().system])


@pytest.fixture(scope="module")
def ds(tmp_path_factory, tok):
    return load_dataset(CFG, tmp_path_factory.mktemp("datasets"), tokenizer=tok)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_prepared_directory_contents(ds):
    m = ds.manifest
    assert set(os.listdir(ds.path)) == {"manifest.json", "items.jsonl", "train.array_record-00000-of-00001",
                                        "valid.array_record-00000-of-00001", "test.array_record-00000-of-00001"}
    s = m["stats"]
    assert sum(v["instances"] for v in s["splits"].values()) == s["interactions"] - s["users"]
    assert m["truncation"]["train"]["prompts_truncated"] > 0  # the 160-token budget forces truncation
    assert m["prompt_tokens"]["train"]["max"] <= 160
    assert ds.num_items == SRC.num_items and ds.item_texts[0] == ""
    recs = list(ds.records("train"))
    assert len(recs) == s["splits"]["train"]["instances"]
    assert [r["index"] for r in recs] == list(range(len(recs)))
    dropped = sum(r["history_dropped"] for r in recs)
    assert dropped == m["truncation"]["train"]["history_items_dropped"]
    for r in recs:
        assert 1 <= r["target"] <= ds.num_items and r["target"] not in r["negatives"]
        assert all(1 <= n <= ds.num_items for n in r["negatives"]) and 0 not in r["history"]
    assert ds.config == CFG


def test_prepare_reuses_and_keys_by_config(tmp_path, tok):
    logs = []
    a = prepare_dataset(CFG, tmp_path, tokenizer=tok, log=logs.append)
    mtime = os.path.getmtime(a / "manifest.json")
    b = prepare_dataset(CFG, tmp_path, tokenizer=tok, log=logs.append)
    assert a == b and os.path.getmtime(b / "manifest.json") == mtime and logs[-1].startswith("reusing")
    c = prepare_dataset(DataConfig(source=SRC, split=SplitConfig(window=8, kind="leave_one_out"),
                                   num_negatives=5), tmp_path, tokenizer=tok)
    d = prepare_dataset(CFG, tmp_path, tokenizer=None)  # a different tokenizer (none) is a different dataset
    assert len({a, c, d}) == 3 and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_interrupted_prepare_leaves_nothing_trusted(tmp_path, tok, monkeypatch):
    import rporec_jax.data.storage as storage

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "sample_negatives", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(CFG, tmp_path, tokenizer=tok)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    path = prepare_dataset(CFG, tmp_path, tokenizer=tok)
    assert open_dataset(path).manifest["stats"]["users"] == 120
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a \\(complete\\) prepared dataset"):
        open_dataset(path)


def test_bucket_length():
    assert [bucket_length(n, (64, 128)) for n in (1, 64, 65, 128, 129, 300)] == [64, 64, 128, 128, 256, 384]


def test_train_loader_batches(ds):
    cfg = LoaderConfig(batch_size=16, seed=1, length_buckets=(64, 128, 192), pad_side="left")
    batches = list(make_loader(ds, "train", cfg))
    n = ds.manifest["stats"]["splits"]["train"]["instances"]
    assert len(batches) == n // 16
    seen = np.concatenate([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen) == (n // 16) * 16
    assert seen.tolist() != sorted(seen.tolist())  # shuffled
    recs = {r["index"]: r for r in ds.records("train")}
    for b in batches:
        assert b["prompt_ids"].shape[1] in (64, 128, 192) and b["history"].shape == (16, 8)
        assert b["negatives"].shape == (16, 5) and b["valid"].all()
        for i in range(16):
            r = recs[int(b["index"][i])]
            ids = b["prompt_ids"][i][b["prompt_mask"][i]].tolist()
            assert ids == r["prompt_ids"] and b["prompt_mask"][i, -1]  # left padding
            assert b["history"][i, : b["history_len"][i]].tolist() == r["history"] and b["target"][i] == r["target"]


def test_epochs_reshuffle_and_resample_negatives(ds):
    cfg = LoaderConfig(batch_size=8, seed=0, num_epochs=2, resample_negatives=True)
    batches = list(make_loader(ds, "train", cfg))
    n = ds.manifest["stats"]["splits"]["train"]["instances"]
    # Batches run across the epoch boundary; only the final partial batch is dropped.
    idx = np.concatenate([b["index"] for b in batches])
    negs = np.concatenate([b["negatives"] for b in batches])
    assert len(idx) == (2 * n) // 8 * 8
    e1, e2 = idx[:n], idx[n:]
    assert sorted(e1.tolist()) == list(range(n)) and set(e2.tolist()) <= set(e1.tolist())
    assert e1[: len(e2)].tolist() != e2.tolist()  # each epoch has its own order
    neg1 = {int(i): negs[k].tolist() for k, i in enumerate(e1)}
    neg2 = {int(i): negs[n + k].tolist() for k, i in enumerate(e2)}
    assert sum(neg1[i] != neg2[i] for i in neg2) > 0.9 * len(neg2)
    for b in batches:
        assert not np.any(b["negatives"] == b["target"][:, None]) and np.all(b["negatives"] >= 1)


def test_resume_from_iterator_state(ds):
    cfg = LoaderConfig(batch_size=8, seed=5, num_epochs=2, resample_negatives=True)
    it = make_loader(ds, "train", cfg)
    _take(it, 7)
    state = it.get_state()
    rest = list(it)
    assert len(rest) > 10
    it2 = make_loader(ds, "train", cfg)
    it2.set_state(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint round trip
    assert _same(list(it2), rest)
    it3 = make_loader(ds, "train", LoaderConfig(batch_size=8, seed=6, num_epochs=2))
    it3.set_state(state)
    assert not _same(list(it3), rest)  # a different seed is a different stream: the check above can fail


def test_process_shards_are_disjoint_and_equal(ds):
    n = ds.manifest["stats"]["splits"]["train"]["instances"]
    shards = [list(make_loader(ds, "train", LoaderConfig(batch_size=4, seed=3), process_index=p, process_count=3))
              for p in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == (n // 3) // 4
    idx = [set(np.concatenate([b["index"] for b in s]).tolist()) for s in shards]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])


def test_eval_loader_pads_last_batch_and_covers_split(ds):
    n = ds.manifest["stats"]["splits"]["test"]["instances"]
    cfg = LoaderConfig(batch_size=32, shuffle=False, drop_remainder=False)
    got = []
    for p in range(2):
        batches = list(make_loader(ds, "test", cfg, process_index=p, process_count=2))
        assert all(b["index"].shape == (32,) for b in batches)
        got += np.concatenate([b["index"][b["valid"]] for b in batches]).tolist()
    assert sorted(got) == list(range(n))


def test_cli_prepare_and_stats(tmp_path, capsys):
    assert cli_main(["prepare", "--source", "synthetic", "--num-users", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = out.splitlines()[0]
    assert "users       30" in out and "train  instances" in out
    assert cli_main(["stats", path]) == 0
    assert "items       128" in capsys.readouterr().out
