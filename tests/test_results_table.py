"""benchmarks/results.py: how each variant's config is built, how seeds aggregate into the table, and the CIs
and paired tests it computes from the per-instance ranks every run saves."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("results_table", Path(__file__).parents[1] / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)
VARIANTS = {v[0]: v for v in results.VARIANTS + results.ABLATIONS}


def test_variants_share_seeds_and_run_baselines_only_when_named():
    base = results.variant_config("synthetic", 3, VARIANTS["base"], ["limits.test=8"])
    assert (base.seed, base.stage1.seed, base.stage2.seed, base.cot.seed) == (3, 3, 3, 3)
    assert base.eval.baselines and base.limits.test == 8
    # a variant re-running the baselines would add duplicate popular/sasrec rows
    assert results.variant_config("synthetic", 3, VARIANTS["prompt_only"], []).eval.baselines == ()
    everyone = results.variant_config("synthetic", 3, VARIANTS["all_users"], ["limits.test=8"])
    assert everyone.eval.baselines == ("popular", "sasrec")
    assert (everyone.limits.valid, everyone.limits.test) == (0, 0)  # the variant's limits win over --set
    big = results.variant_config("synthetic", 0, VARIANTS["train4096"], [])
    assert (big.rechead.variant, big.limits.train, big.stage1.optim.total_steps) == ("prompt_only", 4096, 768)


def test_every_table_row_has_a_place_in_the_order():
    produced = {row for v in VARIANTS.values() for row in v[4].values()} | {"popular", "sasrec", "stage1", "stage2"}
    assert produced <= set(results.ORDER)


def test_aggregate_mean_and_population_std_over_seeds():
    rows = [{"config": "demo", "row": "stage1", "split": "test", "seed": s, "device": "cpu", "wall_s": w,
             **{m: v for m in results.METRICS}} for s, v, w in ((0, 0.1, 10.0), (1, 0.3, 20.0), (2, 0.8, 30.0))]
    (agg,) = results.aggregate(rows)
    assert agg["seeds"] == 3 and agg["ndcg@10"] == pytest.approx(0.4) and agg["wall_s"] == pytest.approx(20.0)
    assert agg["ndcg@10_std"] == pytest.approx(np.std([0.1, 0.3, 0.8]))
    line = results.markdown([agg]).splitlines()[2]
    assert line.startswith("| demo | stage1 | 3 | - | - | 0.4000 ± 0.2944 |")  # no valid split: dashes


def _save_ranks(path, users, positions, ranks):
    """Writes a ranks file as the pipeline does (`Pipeline._save_ranks`): one record per instance."""
    recs = np.zeros(len(ranks), [("index", np.int64), ("user", np.int64), ("position", np.int64), ("rank", np.int32)])
    recs["index"], recs["user"], recs["position"], recs["rank"] = np.arange(len(ranks)), users, positions, ranks
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, recs)


def _table_rows(out):
    """Two seeds of popular, sasrec, prompt_only, stage1, stage2 on 60 instances of 40 users; prompt_only's test
    instances differ in one position; stage2 ranks 40 of stage1's test targets first; prompt_only is best on
    valid, then stage1, then stage2. Seed 1's files hold the instances in another order."""
    from rporec_jax.eval import rank_metrics

    users = np.r_[np.arange(40), np.arange(20)]
    positions = np.r_[np.full(40, 5), np.full(20, 4)]
    rows = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        order = rng.permutation(60) if seed else np.arange(60)
        stage1 = rng.integers(1, 100, 60)
        test = {"popular": rng.integers(1, 100, 60), "sasrec": rng.integers(1, 100, 60),
                "prompt_only": rng.integers(1, 100, 60), "stage1": stage1, "stage2": np.r_[np.ones(40), stage1[40:]]}
        valid = {"popular": 50, "sasrec": 50, "prompt_only": 1, "stage1": 2, "stage2": 3}
        for row in test:
            for split, ranks in (("valid", np.full(60, valid[row])), ("test", test[row])):
                pos = positions.copy()
                if row == "prompt_only" and split == "test":
                    pos[0] = 3
                rel = f"synthetic-s{seed}/{row}_{split}_ranks.npy"
                _save_ranks(out / rel, users[order], pos[order], ranks[order])
                rows.append({"config": "synthetic", "seed": seed, "row": row, "split": split, "wall_s": 1.0,
                             "device": "cpu", "ranks_file": rel,
                             **{k: float(v.mean()) for k, v in rank_metrics(ranks).items()}})
    return rows


def test_intervals_and_paired_tests_from_saved_ranks(tmp_path):
    from rporec_jax.eval import rank_metrics
    from rporec_jax.stats import bootstrap_ci

    rows = _table_rows(tmp_path)
    ranks = results.load_ranks(tmp_path, rows)
    agg = results.add_intervals(results.aggregate(rows), ranks)
    by = {(a["row"], a["split"]): a for a in agg}
    # stage1 test: per-instance NDCG@10 averaged over the two seeds, matched by (user, position) across files
    per_key = {}
    for seed in (0, 1):
        recs = np.load(tmp_path / f"synthetic-s{seed}/stage1_test_ranks.npy")
        for u, p, v in zip(recs["user"], recs["position"], rank_metrics(recs["rank"])["ndcg@10"]):
            per_key.setdefault((u, p), []).append(v)
    first = np.load(tmp_path / "synthetic-s0/stage1_test_ranks.npy")
    expected = bootstrap_ci([np.mean(per_key[(u, p)]) for u, p in zip(first["user"], first["position"])])
    stage1 = by[("stage1", "test")]
    assert stage1["ndcg@10_ci"] == pytest.approx(list(expected))
    assert stage1["ndcg@10_ci"][0] == pytest.approx(stage1["ndcg@10"])  # the mean over seeds of the means
    assert (stage1["users"], stage1["instances"]) == (40, 60)
    line = next(x for x in results.markdown(agg).splitlines() if x.startswith("| synthetic | stage1 |"))
    assert "| {:.4f} [{:.4f}, {:.4f}] |".format(*expected) in line and "| 40 (60 inst.) / 40 (60 inst.) |" in line

    paired = {(e["a"], e["b"]): e for e in results.paired_tests(agg, ranks)}
    # the best LLM row is chosen on valid among those on SASRec's test instances (prompt_only is not; stage2 would
    # be best on test)
    assert set(paired) == {("stage2", "stage1"), ("stage1", "prompt_only"), ("stage1", "sasrec")}
    gain = paired[("stage2", "stage1")]
    want = by[("stage2", "test")]["ndcg@10"] - stage1["ndcg@10"]
    assert gain["ndcg@10"]["diff"] == pytest.approx(want) and gain["ndcg@10"]["low"] < want < gain["ndcg@10"]["high"]
    assert gain["ndcg@10"]["p"] < 0.001 and gain["ndcg@10"]["low"] > 0 and gain["instances"] == 60
    assert paired[("stage1", "prompt_only")]["error"] == ("the rows were not measured on the same instances: "
                                                          "60 vs 60 instances, 59 shared")
    table = results.paired_markdown(list(paired.values()))
    assert "| synthetic | stage1 - prompt_only | 2 | - | refused: the rows were not measured" in table
    assert f"| synthetic | stage2 - stage1 | 2 | 60 | {want:+.4f} [" in table


def test_seeds_of_one_row_on_other_instances_are_refused(tmp_path):
    rows = _table_rows(tmp_path)
    recs = np.load(tmp_path / "synthetic-s1/popular_test_ranks.npy")
    _save_ranks(tmp_path / "synthetic-s1/popular_test_ranks.npy", recs["user"] + 100, recs["position"], recs["rank"])
    with pytest.raises(ValueError, match="synthetic popular test: .* 60 vs 60 instances, 0 shared"):
        results.add_intervals(results.aggregate(rows), results.load_ranks(tmp_path, rows))


def test_every_row_saves_ranks_that_give_its_metrics_and_the_table_reads_them(tmp_path, monkeypatch):
    from rporec_jax import config as C
    from rporec_jax.baselines import popularity_counts, popularity_scores
    from rporec_jax.data import load_dataset
    from rporec_jax.eval import rank_metrics

    monkeypatch.setenv("TQDM_DISABLE", "1")
    args = ["--configs", "synthetic", "--seeds", "0", "--variants", "all_users", "--set", "stage1.epochs=1",
            "--set", "eval.sasrec_epochs=1", "--out", str(tmp_path)]
    assert results.main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert {(r["row"], r["split"]) for r in rows} == {(r, s) for r in ("popular_all", "sasrec_all", "prompt_only_all")
                                                     for s in ("valid", "test")}
    ds = load_dataset(C.load_config("synthetic").data)
    scores = popularity_scores(popularity_counts(ds))
    for r in rows:
        recs = np.load(tmp_path / r["ranks_file"])
        assert {k: float(v.mean()) for k, v in rank_metrics(recs["rank"]).items()} == pytest.approx(
            {k: r[k] for k in results.METRICS}, abs=1e-9), r["row"]
        # every instance of the split (limits 0), keyed by its record's user and position
        split = list(ds.records(r["split"]))
        assert recs[["index", "user", "position"]].tolist() == [(x["index"], x["user"], x["position"]) for x in split]
        if r["row"] == "popular_all":  # each rank belongs to its instance: most-popular ranks by item alone
            assert recs["rank"].tolist() == [int(np.sum(scores[1:] >= scores[x["target"]])) for x in split]
    n_test = sum(1 for _ in ds.records("test"))
    saved = json.loads((tmp_path / "results.json").read_text())
    (pair,) = saved["paired_tests"]
    assert (pair["a"], pair["b"], pair["instances"]) == ("prompt_only_all", "sasrec_all", n_test)
    assert all("ndcg@10_ci" in a and a["instances"] == n_test for a in saved["aggregate"] if a["split"] == "test")
    text = (tmp_path / "results.md").read_text()
    assert "| synthetic | prompt_only_all - sasrec_all | 1 |" in text
    # the table is rebuilt from rows.jsonl and the saved ranks alone, identically
    assert results.main([*args, "--report_only"]) == 0 and (tmp_path / "results.md").read_text() == text
