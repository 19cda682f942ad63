"""The results table (issue #8): every variant on the same splits, instances, seeds and full-ranking protocol.

    RPOREC_DATA_DIR=../shared/data python benchmarks/results.py --configs demo scientific --seeds 0 1 2 \
        --out runs/results

Per (config, seed) it runs, in run directories under --out:
  base        cot -> stage1 (text_fusion) -> stage2 -> eval     rows popular, sasrec, stage1, stage2
  prompt_only stage1 with the no-reasoning Rechead               row prompt_only
  refresh     stage2 + eval with the Rechead refresh (reuses base's CoT and stage-1 Rechead)   row stage2_refresh
  hidden      stage1 + stage2 + eval with the hidden_state Rechead (reuses base's CoT)
              rows hidden_stage1, hidden_stage2
and, only when named in --variants (ABLATIONS):
  lr1e-4      stage2 + eval at 100x the reference lr (reuses base's CoT and stage-1 Rechead)   row stage2_lr1e-4
  all_users   prompt_only stage1 + most-popular + SASRec on every valid/test user   rows *_all
  train4096   prompt_only stage1 fit on 4,096 train instances, every valid/test user   row prompt_only_train4096_all
and writes mean +- std over seeds, wall time and device per row to `<out>/results.md` and `results.json`,
with each row's test NDCG@10 and HR@10 as a 95% bootstrap CI over instances and its number of users, and a
table of paired tests (stage2 vs stage1, stage1 vs prompt_only, the best LLM row vs SASRec), both read from
the per-instance ranks every run saves (`<run>/eval/<row>_<split>_ranks.npy`).
Any `--set KEY=VALUE` applies to every run (e.g. smaller limits for a quick pass).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from numpy.lib import recfunctions

from rporec_jax.stats import align, bootstrap_ci, paired_comparison

METRICS = ("ndcg@5", "ndcg@10", "ndcg@20", "hr@5", "hr@10", "hr@20")
# (variant, rechead/stage overrides, stages, what it reuses from the base run, {row in run: row in the table})
VARIANTS = (
    ("base", [], "cot,stage1,stage2,eval", (), {}),
    ("prompt_only", ["rechead.variant=prompt_only"], "stage1", (), {"stage1": "prompt_only"}),
    ("refresh", ["stage2.refresh_every=1"], "stage2,eval", ("cot", "stage1"), {"stage2": "stage2_refresh"}),
    ("hidden", ["rechead.variant=hidden_state"], "stage1,stage2,eval", ("cot",),
     {"stage1": "hidden_stage1", "stage2": "hidden_stage2"}),
)
ALL_USERS = ["rechead.variant=prompt_only", "limits.valid=0", "limits.test=0"]
# Run only when named in --variants: does GRPO change the stage-1 rows once the policy moves (100x the lr)?
ABLATIONS = (
    ("lr1e-4", ["stage2.optim.lr=1e-4"], "stage2,eval", ("cot", "stage1"), {"stage2": "stage2_lr1e-4"}),
    # The rows that need no CoT, on every valid/test user (16 users resolve nothing), and the Rechead fit on
    # 4,096 train instances instead of 48 (3 epochs x 256 steps of batch 16): does it generalise given data?
    ("all_users", [*ALL_USERS, "eval.baselines=popular,sasrec"], "stage1,eval", (),
     {"stage1": "prompt_only_all", "popular": "popular_all", "sasrec": "sasrec_all"}),
    ("train4096", [*ALL_USERS, "limits.train=4096", "stage1.epochs=3", "stage1.optim.total_steps=768"], "stage1",
     (), {"stage1": "prompt_only_train4096_all"}),
)


def variant_config(config: str, seed: int, variant, extra: list[str]):
    """Returns the validated RunConfig of one (config, seed, variant): every seed set to `seed`, then `extra`,
    then the variant's overrides and stages. Variants run no baselines unless their overrides name some."""
    from rporec_jax import config as C

    name, overrides, stages, _, _ = variant
    own_baselines = [] if name == "base" else ["eval.baselines="]
    cfg = C.load_config(config, [f"seed={seed}", f"stage1.seed={seed}", f"stage2.seed={seed}", f"cot.seed={seed}",
                                 *extra, *own_baselines, *overrides, f"stages={stages}"])
    C.validate(cfg)
    return cfg


def run_variant(config: str, seed: int, variant, out: Path, extra: list[str]) -> list[dict]:
    """Runs one variant (reusing the base run's finished stages) and returns its result rows, renamed."""
    from rporec_jax import config as C
    from rporec_jax.pipeline import Pipeline

    name, _, _, reuse, rename = variant
    cfg = variant_config(config, seed, variant, extra)
    run_dir = out / f"{config}-s{seed}" / name
    base = out / f"{config}-s{seed}" / "base"
    resume = (run_dir / "progress.json").exists()
    if not resume and reuse:
        run_dir.mkdir(parents=True, exist_ok=True)
        done = []
        if "cot" in reuse:
            shutil.copytree(base / "cot", run_dir / "cot", dirs_exist_ok=True)
            done.append("cot")
        if "stage1" in reuse:
            shutil.copytree(base / "ckpt" / "stage1_rechead", run_dir / "ckpt" / "stage1_rechead", dirs_exist_ok=True)
            done.append("stage1")
        (run_dir / "config.json").write_text(json.dumps(C.to_dict(cfg)))
        (run_dir / "progress.json").write_text(json.dumps({"done": done, "results": []}))
        resume = True
    t = time.time()
    pipe = Pipeline(cfg, str(run_dir), resume=resume, progress=False)
    try:
        pipe.run()
    finally:
        pipe.logger.close()
    rows = []
    for r in pipe.progress_state["results"]:
        if name != "base" and r["row"] not in rename:
            continue
        rows.append({**r, "row": rename.get(r["row"], r["row"]), "config": config, "seed": seed,
                     "ranks_file": str(run_dir.relative_to(out) / "eval" / f"{r['row']}_{r['split']}_ranks.npy")})
    print(f"[results] {config} seed {seed} {name}: {len(rows)} rows in {time.time() - t:.0f} s", flush=True)
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """Returns one row per (config, row, split) with mean and std over seeds of every metric and wall time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["row"], r["split"]), []).append(r)
    out = []
    for (config, row, split), rs in groups.items():
        agg = {"config": config, "row": row, "split": split, "seeds": len(rs), "device": rs[0].get("device", "")}
        for k in (*METRICS, "wall_s"):
            vals = np.asarray([r[k] for r in rs if k in r], np.float64)
            agg[k] = float(vals.mean()) if len(vals) else None
            agg[f"{k}_std"] = float(vals.std()) if len(vals) else None
        out.append(agg)
    return out


# Metrics given a bootstrap CI per row and compared in the paired tests (test split).
CI_METRICS = ("ndcg@10", "hr@10")
BASELINES = ("popular", "sasrec")  # row-name prefixes of the rows that are not the LLM


# benchmarks/sasrec_recbole.py's datasets -> the config whose rows they join in the table.
SASREC_RECBOLE_CONFIGS = {"ml-100k": "demo", "scientific": "scientific"}


def sasrec_recbole_rows(path: Path) -> list[dict]:
    """Returns rows 'sasrec_recbole' (valid and test, per dataset and seed) from the JSON that
    `benchmarks/sasrec_recbole.py` writes, runs with overrides left out: SASRec at RecBole strength on the
    reference splits (W = 20, every valid/test instance), so its instances are not the LLM rows' (no CI, no
    paired test); it sits in the table next to `sasrec` (the LLM rows' window) to show the baseline's strength."""
    rows = []
    for rec in json.loads(Path(path).read_text()).values():
        if rec.get("overrides") or rec["dataset"] not in SASREC_RECBOLE_CONFIGS:
            continue
        for split in ("valid", "test"):
            rows.append({**{k: rec[split][k] for k in METRICS}, "row": "sasrec_recbole", "split": split,
                         "config": SASREC_RECBOLE_CONFIGS[rec["dataset"]], "seed": rec["seed"],
                         "variant": "sasrec_recbole", "wall_s": rec["wall_s"], "device": rec["device"]})
    return rows


def load_ranks(out: Path, rows: list[dict]) -> dict[tuple, dict[int, np.ndarray]]:
    """Returns {(config, row, split): {seed: per-instance records (index, user, position, rank)}} for the rows
    whose run saved ranks (rows run before ranks were saved have none)."""
    found: dict[tuple, dict[int, np.ndarray]] = {}
    for r in rows:
        if "ranks_file" in r and (out / r["ranks_file"]).exists():
            found.setdefault((r["config"], r["row"], r["split"]), {})[r["seed"]] = np.load(out / r["ranks_file"])
    return found


def _keys(recs: np.ndarray) -> np.ndarray:
    """Returns the instance keys [n] (user, position) of saved per-instance records [n]."""
    return recfunctions.repack_fields(recs[["user", "position"]])


def _same_instances(recs_a: np.ndarray, recs_b: np.ndarray) -> bool:
    try:
        align(_keys(recs_a), _keys(recs_b))
    except ValueError:
        return False
    return True


def seed_mean(by_seed: dict[int, np.ndarray], seeds, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (keys [n] (user, position), values [n]): per instance, `metric` averaged over `seeds`, in the
    first seed's order. Raises ValueError when the seeds were not measured on the same instances."""
    from rporec_jax.eval import rank_metrics

    keys = _keys(by_seed[seeds[0]])
    total = np.zeros(len(keys))
    for seed in seeds:
        recs = by_seed[seed]
        order, order_seed = align(keys, _keys(recs))
        total[order] += rank_metrics(recs["rank"][order_seed], [int(metric.split("@")[1])])[metric]
    return keys, total / len(seeds)


def add_intervals(agg: list[dict], ranks: dict) -> list[dict]:
    """Returns `agg` with, where the runs saved ranks, 'users' and 'instances' and per CI_METRICS metric
    '<metric>_ci' = [mean, low, high]: the 95% percentile-bootstrap CI over instances of the metric averaged
    over seeds per instance."""
    out = []
    for a in agg:
        by_seed = ranks.get((a["config"], a["row"], a["split"]))
        if by_seed is not None:
            a = dict(a)
            for metric in CI_METRICS:
                try:
                    keys, values = seed_mean(by_seed, sorted(by_seed), metric)
                except ValueError as e:
                    raise ValueError(f"{a['config']} {a['row']} {a['split']}: {e}") from None
                a[f"{metric}_ci"] = list(bootstrap_ci(values))
            a["users"], a["instances"] = len(np.unique(keys["user"])), len(keys)
        out.append(a)
    return out


def comparisons(agg: list[dict], ranks: dict) -> list[tuple[str, str, str]]:
    """Returns the (config, row a, row b) pairs to test: stage2 vs stage1, stage1 vs prompt_only and, per SASRec
    row, the LLM row with the best valid NDCG@10 (chosen on valid, tested on test) among those measured on that
    SASRec row's test instances."""
    valid = {(a["config"], a["row"]): a["ndcg@10"] for a in agg if a["split"] == "valid"}
    out = []
    for config in sorted({c for c, _, _ in ranks}):
        tested = {row for c, row, split in ranks if c == config and split == "test"}
        out += [(config, a, b) for a, b in (("stage2", "stage1"), ("stage1", "prompt_only")) if {a, b} <= tested]
        first = {row: next(iter(ranks[(config, row, "test")].values())) for row in tested}
        for sasrec in sorted(r for r in tested if r.startswith("sasrec")):
            same = [r for r in sorted(tested, key=_order) if not r.startswith(BASELINES) and (config, r) in valid
                    and _same_instances(first[r], first[sasrec])]
            if same:
                out.append((config, max(same, key=lambda r: valid[(config, r)]), sasrec))
    return out


def paired_tests(agg: list[dict], ranks: dict) -> list[dict]:
    """Returns one entry per `comparisons` pair: on the test instances, averaged over the seeds both rows ran,
    per CI_METRICS metric the mean difference a - b with its paired-bootstrap 95% CI and sign-flip p-value
    (`rporec_jax.stats.paired_comparison`), or 'error' when the rows were not measured on the same instances."""
    table = []
    for config, a, b in comparisons(agg, ranks):
        by_a, by_b = ranks[(config, a, "test")], ranks[(config, b, "test")]
        seeds = sorted(set(by_a) & set(by_b))
        entry = {"config": config, "a": a, "b": b, "seeds": len(seeds)}
        try:
            if not seeds:
                raise ValueError(f"no seed ran both rows ({a}: {sorted(by_a)}, {b}: {sorted(by_b)})")
            for metric in CI_METRICS:
                (keys_a, a_values), (keys_b, b_values) = seed_mean(by_a, seeds, metric), seed_mean(by_b, seeds, metric)
                res = paired_comparison(a_values, b_values, keys_a, keys_b)
                entry[metric], entry["instances"] = res._asdict(), res.n
        except ValueError as e:
            entry["error"] = str(e)
        table.append(entry)
    return table


ORDER = ("popular", "sasrec", "prompt_only", "stage1", "stage2", "stage2_refresh", "stage2_lr1e-4", "hidden_stage1",
         "hidden_stage2", "popular_all", "sasrec_all", "sasrec_recbole", "prompt_only_all",
         "prompt_only_train4096_all")


def _order(row: str) -> int:
    return ORDER.index(row) if row in ORDER else len(ORDER)


def _ci(a: dict | None, metric: str) -> str:
    if a is None or f"{metric}_ci" not in a:
        return "-"
    return "{:.4f} [{:.4f}, {:.4f}]".format(*a[f"{metric}_ci"])


def _users(a: dict | None) -> str:
    if a is None or "users" not in a:
        return "-"
    return str(a["users"]) if a["users"] == a["instances"] else f"{a['users']} ({a['instances']} inst.)"


def markdown(agg: list[dict]) -> str:
    """Returns the table: one line per (config, row), valid and test NDCG/HR@10 plus @5/@20 NDCG, mean +- std
    over seeds, then test NDCG/HR@10 with their 95% bootstrap CI over instances and the users per split."""
    lines = ["| data | row | seeds | valid NDCG@10 | valid HR@10 | test NDCG@5 | test NDCG@10 | test NDCG@20 | "
             "test HR@10 | test HR@20 | test NDCG@10 [95% CI] | test HR@10 [95% CI] | users valid / test | "
             "wall s | device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    by = {(a["config"], a["row"], a["split"]): a for a in agg}
    f = lambda a, k: "-" if a is None or a.get(k) is None else f"{a[k]:.4f} ± {a[k + '_std']:.4f}"  # noqa: E731
    for config in sorted({a["config"] for a in agg}):
        for row in sorted({a["row"] for a in agg if a["config"] == config}, key=_order):
            v, t = by.get((config, row, "valid")), by.get((config, row, "test"))
            any_ = t or v
            lines.append(f"| {config} | {row} | {any_['seeds']} | {f(v, 'ndcg@10')} | {f(v, 'hr@10')} | "
                         f"{f(t, 'ndcg@5')} | {f(t, 'ndcg@10')} | {f(t, 'ndcg@20')} | {f(t, 'hr@10')} | "
                         f"{f(t, 'hr@20')} | {_ci(t, 'ndcg@10')} | {_ci(t, 'hr@10')} | {_users(v)} / {_users(t)} | "
                         f"{any_['wall_s']:.0f} | {any_['device']} |")
    return "\n".join(lines) + "\n"


def paired_markdown(table: list[dict]) -> str:
    """Returns the paired-test table: per pair, the test difference a - b of each CI_METRICS metric with its
    95% CI and two-sided p-value (not adjusted for the several tests)."""
    lines = ["| data | test: a - b | seeds | instances | Δ NDCG@10 [95% CI] | p | Δ HR@10 [95% CI] | p |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in table:
        head = f"| {e['config']} | {e['a']} - {e['b']} | {e['seeds']} |"
        if "error" in e:
            lines.append(f"{head} - | refused: {e['error']} | | | |")
            continue
        cells = [f"{r['diff']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}] | {r['p']:.3g}"
                 for r in (e[m] for m in CI_METRICS)]
        lines.append(f"{head} {e['instances']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Stage-2 curve columns: what tells whether GRPO could move the policy (reward signal, KL, entropy, lengths).
CURVE = ("reward/total", "reward/ndcg", "advantage_std", "zero_std_groups", "grad_norm", "kl", "entropy",
         "completion_length")
CURVE_RUNS = {"base": "stage2", "refresh": "stage2_refresh", "lr1e-4": "stage2_lr1e-4", "hidden": "hidden_stage2"}


def stage2_curves(out: Path, rows: list[dict]) -> list[dict]:
    """Returns per (config, GRPO row) the first- and last-step value of each CURVE metric, mean over seeds,
    read from the runs' metrics.jsonl."""
    from rporec_jax.run_log import read_metrics

    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for config, seed in sorted({(r["config"], r["seed"]) for r in rows}):
        for variant, row in CURVE_RUNS.items():
            run = out / f"{config}-s{seed}" / variant
            steps = read_metrics(str(run), "stage2") if (run / "metrics.jsonl").exists() else []
            if steps:
                groups.setdefault((config, row), []).append((steps[0], steps[-1]))
    table = []
    for (config, row), runs in groups.items():
        entry = {"config": config, "row": row, "seeds": len(runs), "steps": int(runs[0][1]["step"])}
        for k in CURVE:
            for when, i in (("first", 0), ("last", 1)):
                vals = [r[i][k] for r in runs if r[i].get(k) is not None]
                entry[f"{k}_{when}"] = float(np.mean(vals)) if vals else None
        table.append(entry)
    return table


def curves_markdown(table: list[dict]) -> str:
    """Returns the stage-2 curve table: first -> last step of each CURVE metric, mean over seeds."""
    lines = ["| data | row | seeds | steps | " + " | ".join(CURVE) + " |",
             "|---|---|---:|---:|" + "---:|" * len(CURVE)]
    for e in sorted(table, key=lambda e: (e["config"], ORDER.index(e["row"]))):
        cells = []
        for k in CURVE:
            a, b = e[f"{k}_first"], e[f"{k}_last"]
            cells.append("-" if a is None or b is None else f"{a:.3g} → {b:.3g}")
        lines.append(f"| {e['config']} | {e['row']} | {e['seeds']} | {e['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["demo", "scientific"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS],
                    help=f"default: all but the ablations {[v[0] for v in ABLATIONS]}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--sasrec_recbole", metavar="JSON", help="add the sasrec_recbole rows from this output of "
                    "benchmarks/sasrec_recbole.py (SASRec at RecBole strength on the W = 20 reference splits)")
    ap.add_argument("--report_only", action="store_true",
                    help="rewrite results.md/json from rows.jsonl (e.g. after runs in several processes); run nothing")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.jsonl"
    rows = [json.loads(x) for x in rows_path.read_text().splitlines()] if rows_path.exists() else []
    finished = {(r["config"], r["seed"], r["variant"]) for r in rows}
    for config in [] if args.report_only else args.configs:
        for seed in args.seeds:
            for variant in VARIANTS + ABLATIONS:
                if variant[0] not in args.variants or (config, seed, variant[0]) in finished:
                    continue
                new = [{**r, "variant": variant[0]} for r in run_variant(config, seed, variant, out, args.set)]
                with open(rows_path, "a") as fh:  # appended per variant: an interrupted table resumes
                    fh.writelines(json.dumps(r) + "\n" for r in new)
                rows += new
    if args.sasrec_recbole:
        rows = rows + sasrec_recbole_rows(Path(args.sasrec_recbole))  # not in rows.jsonl: read afresh each time
    ranks = load_ranks(out, rows)
    agg, curves = add_intervals(aggregate(rows), ranks), stage2_curves(out, rows)
    paired = paired_tests(agg, ranks)
    (out / "results.json").write_text(json.dumps({"rows": rows, "aggregate": agg, "paired_tests": paired,
                                                  "stage2_curves": curves, "overrides": args.set}, indent=1))
    text = (markdown(agg) + "\nPaired tests on the test instances (per-instance metrics averaged over the seeds "
            "both rows ran; 95% paired-bootstrap CI, sign-flip permutation p):\n\n" + paired_markdown(paired)
            + "\nStage 2, first → last GRPO step (mean over seeds):\n\n" + curves_markdown(curves))
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
