"""benchmarks/results.py: how each variant's config is built and how seeds aggregate into the table."""

import importlib.util
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
