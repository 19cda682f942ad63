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
and writes mean +- std over seeds, wall time and device per row to `<out>/results.md` and `results.json`.
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
        rows.append({**r, "row": rename.get(r["row"], r["row"]), "config": config, "seed": seed})
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


ORDER = ("popular", "sasrec", "prompt_only", "stage1", "stage2", "stage2_refresh", "stage2_lr1e-4", "hidden_stage1",
         "hidden_stage2", "popular_all", "sasrec_all", "prompt_only_all", "prompt_only_train4096_all")


def markdown(agg: list[dict]) -> str:
    """Returns the table: one line per (config, row), valid and test NDCG/HR@10 plus @5/@20 NDCG, mean +- std."""
    lines = ["| data | row | seeds | valid NDCG@10 | valid HR@10 | test NDCG@5 | test NDCG@10 | test NDCG@20 | "
             "test HR@10 | test HR@20 | wall s | device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    by = {(a["config"], a["row"], a["split"]): a for a in agg}
    f = lambda a, k: "-" if a is None or a.get(k) is None else f"{a[k]:.4f} ± {a[k + '_std']:.4f}"  # noqa: E731
    for config in sorted({a["config"] for a in agg}):
        for row in sorted({a["row"] for a in agg if a["config"] == config},
                          key=lambda r: ORDER.index(r) if r in ORDER else len(ORDER)):
            v, t = by.get((config, row, "valid")), by.get((config, row, "test"))
            any_ = t or v
            lines.append(f"| {config} | {row} | {any_['seeds']} | {f(v, 'ndcg@10')} | {f(v, 'hr@10')} | "
                         f"{f(t, 'ndcg@5')} | {f(t, 'ndcg@10')} | {f(t, 'ndcg@20')} | {f(t, 'hr@10')} | "
                         f"{f(t, 'hr@20')} | {any_['wall_s']:.0f} | {any_['device']} |")
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
    agg, curves = aggregate(rows), stage2_curves(out, rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "aggregate": agg, "stage2_curves": curves,
                                                  "overrides": args.set}, indent=1))
    text = markdown(agg) + "\nStage 2, first → last GRPO step (mean over seeds):\n\n" + curves_markdown(curves)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
