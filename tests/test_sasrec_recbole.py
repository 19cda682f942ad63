"""SASRec at RecBole strength (issue #16 item 6): full-softmax loss, early stopping, config ranges, the two
architectures, the packed dropout masks, and the benchmark's reference splits on the real data."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rporec_jax.baselines import sasrec as sr
from rporec_jax.baselines.sasrec import SASRec, SASRecConfig, full_softmax_loss, rbg_key, recbole_config, train_sasrec
from rporec_jax.data import DataConfig, SplitConfig, SyntheticConfig, load_dataset


def _np_full_softmax(user, items, targets, valid):
    logits = user.astype(np.float64) @ items.astype(np.float64).T
    logits = logits[:, 1:]  # column 0 is padding: never a class
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ce = -logp[np.arange(len(targets)), targets - 1]
    return (ce * valid).sum() / max(valid.sum(), 1)


def test_full_softmax_loss_matches_numpy():
    rng = np.random.default_rng(0)
    user = rng.normal(size=(7, 5)).astype(np.float32)
    items = rng.normal(size=(13, 5)).astype(np.float32)
    items[0] = 10.0  # a huge padding row must not enter the softmax
    targets = rng.integers(1, 13, 7).astype(np.int32)
    valid = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    got = jax.jit(full_softmax_loss)(user, items, targets, valid)
    np.testing.assert_allclose(float(got), _np_full_softmax(user, items, targets, valid), rtol=1e-5)
    # the gradient never reaches the padding row, nor flows from invalid rows
    g_items, g_user = jax.grad(lambda i, u: full_softmax_loss(u, i, targets, valid), argnums=(0, 1))(items, user)
    assert not np.asarray(g_items[0]).any() and not np.asarray(g_user[~valid]).any()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_dataset(DataConfig(source=SyntheticConfig(num_users=60, seed=1), split=SplitConfig(window=6),
                                   num_negatives=0), tmp_path_factory.mktemp("tiny"))


def test_early_stopping_stops_after_patience_and_restores_best(tiny, mesh1, monkeypatch):
    scores = iter([0.1, 0.3, 0.2, 0.25, 0.3, 0.9, 0.9])  # best at evaluation 2; 3 (ties count) do not improve
    seen, real = {}, sr.evaluate_sasrec

    def fake(params, ds, split, config, mesh=None, strategy="dp", batches=None):
        if split == "test":
            seen["test"] = params
            return real(params, ds, split, config, mesh)
        epoch = len(seen)
        seen[epoch + 1] = jax.tree_util.tree_map(np.asarray, params)
        return {"ndcg@10": next(scores), "count": 1}

    monkeypatch.setattr(sr, "evaluate_sasrec", fake)
    cfg = SASRecConfig(hidden=8, num_blocks=1, batch_size=32, epochs=20, patience=3, progress=False)
    params, m = train_sasrec(tiny, cfg, jax.random.key(0), mesh=mesh1)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3, 4, 5] and m["stopped_early"]
    assert m["best_epoch"] == 2 and m["valid"]["ndcg@10"] == 0.3
    for got in (params, seen["test"]):
        jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, got), seen[2])
    # without patience every epoch runs
    scores = iter([0.5, 0.1, 0.1])
    monkeypatch.setattr(sr, "evaluate_sasrec", lambda p, d, s, c, *a, **k:
                        real(p, d, s, c, *a) if s == "test" else {"ndcg@10": next(scores)})
    _, m = train_sasrec(tiny, SASRecConfig(**{**cfg.__dict__, "patience": 0, "epochs": 3}), jax.random.key(0),
                        mesh=mesh1)
    assert len(m["epochs"]) == 3 and not m["stopped_early"] and m["best_epoch"] == 1


def test_full_softmax_training_learns(tiny, mesh1):
    cfg = recbole_config(batch_size=32, epochs=3, progress=False, hidden=16, inner_size=32)
    _, m = train_sasrec(tiny, cfg, jax.random.key(0), mesh=mesh1)
    assert m["epochs"][-1]["loss"] < m["epochs"][0]["loss"] and np.isfinite(m["epochs"][-1]["loss"])
    assert 0.0 < m["test"]["hr@10"] <= 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_negatives=-1), r"SASRecConfig.num_negatives=-1: must be >= 0 \(0 = full softmax"),
    (dict(dropout=1.0), r"SASRecConfig.dropout=1.0: must be in \[0, 1\)"),
    (dict(attn_dropout=-0.1), r"SASRecConfig.attn_dropout=-0.1"),
    (dict(patience=-2), r"SASRecConfig.patience=-2: must be >= 0 \(0 = no early stopping\)"),
    (dict(learning_rate=0.0), r"SASRecConfig.learning_rate=0.0"),
    (dict(batch_size=0), r"SASRecConfig.batch_size=0"),
    (dict(arch="bert"), r"SASRecConfig.arch='bert'"),
    (dict(patience=2, eval_every=0), r"patience=2 needs evaluations"),
])
def test_config_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SASRecConfig(**kwargs)


def test_recbole_defaults():
    c = recbole_config()
    assert (c.arch, c.hidden, c.inner_size, c.num_blocks, c.num_heads, c.dropout, c.attn_dropout) == (
        "recbole", 64, 256, 2, 2, 0.5, 0.5)
    assert (c.num_negatives, c.learning_rate, c.batch_size, c.patience, c.max_len) == (0, 1e-3, 2048, 10, 0)


@pytest.mark.parametrize("arch", ["kang", "recbole"])
def test_architectures_mask_padding_and_use_order(arch):
    m = SASRec(num_items=10, max_len=4, hidden=16, num_heads=2, dropout=0.0, inner_size=32, arch=arch)
    p = jax.jit(m.init)(rbg_key(jax.random.key(0)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32))
    apply = jax.jit(m.apply)
    a = apply(p, jnp.array([[1, 2, 3, 0]]), jnp.array([3]))
    same = apply(p, jnp.array([[1, 2, 3, 9]]), jnp.array([3]))  # a masked-out slot must not leak in
    swapped = apply(p, jnp.array([[2, 1, 3, 0]]), jnp.array([3]))
    np.testing.assert_allclose(np.asarray(a), np.asarray(same), atol=1e-6)
    assert not np.allclose(np.asarray(a), np.asarray(swapped), atol=1e-4)


@pytest.mark.parametrize("arch", ["kang", "recbole"])
def test_last_only_block_equals_full_block_last_position(arch):
    blk = sr._Block(hidden=8, num_heads=2, dropout=0.0, inner_size=16, arch=arch)
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    present = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
    seq = present.astype(jnp.int32)
    mask = jnp.logical_and(jnp.tril(jnp.ones((5, 5), bool))[None, None], present[:, None, None, :])
    p = blk.init(jax.random.key(0), x, mask, True)
    full = blk.apply(p, x, mask, True)
    last = blk.apply(p, x, mask, True, last_only=True)
    assert last.shape == (3, 1, 8) and seq.shape == (3, 5)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-5)


def test_dropout_mask_rate_and_keys():
    k = rbg_key(jax.random.key(0))
    for rate in (0.2, 0.5):
        keep = np.asarray(sr.dropout_mask(k, (400, 250), rate))
        assert abs(keep.mean() - (1 - rate)) < 0.01
    a, b = (np.asarray(sr.dropout_mask(kk, (1000,), 0.5)) for kk in (k, jax.random.fold_in(k, 1)))
    assert (a != b).mean() > 0.3
    np.testing.assert_array_equal(a, np.asarray(sr.dropout_mask(k, (1000,), 0.5)))
    assert np.asarray(sr.dropout_mask(jax.random.key(3), (7,), 0.5)).shape == (7,)  # threefry keys too


def test_benchmark_reference_splits():
    root = os.environ.get("RPOREC_DATA_DIR")
    if not root or not (Path(root) / "ml-100k").is_dir() or not (Path(root) / "amazon18-scientific").is_dir():
        pytest.skip("set RPOREC_DATA_DIR to the directory holding ml-100k/ and amazon18-scientific/")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sasrec_recbole import EXPECTED_COUNTS, data_config

    from rporec_jax.data import make_instances

    for name, counts in EXPECTED_COUNTS.items():
        cfg = data_config(name, root)
        inst = make_instances(cfg.source.load(), cfg.split)
        assert tuple(int((inst.split == i).sum()) for i in range(3)) == counts, name
        assert inst.history.shape[1] == 20


def test_results_table_reads_sasrec_recbole_rows(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table_sr", Path(__file__).parents[1] / "benchmarks" /
                                                  "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    metrics = {m: 0.1 for m in results.METRICS}
    rec = {"dataset": "ml-100k", "seed": 0, "overrides": {}, "valid": {**metrics, "count": 9906},
           "test": {**metrics, "ndcg@10": 0.06, "count": 9906}, "wall_s": 12.0, "device": "cpu"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"ml-100k/seed0": rec, "ml-100k/seed0/dropout=0.2": {**rec, "overrides": {"a": 1}}}))
    rows = results.sasrec_recbole_rows(path)
    assert [(r["config"], r["row"], r["split"]) for r in rows] == [("demo", "sasrec_recbole", "valid"),
                                                                   ("demo", "sasrec_recbole", "test")]
    table = results.markdown(results.aggregate(rows))
    assert "| demo | sasrec_recbole | 1 | 0.1000 ± 0.0000 |" in table and "0.0600 ± 0.0000" in table
