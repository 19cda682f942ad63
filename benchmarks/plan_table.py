"""Plans of the paper setting (Qwen3-0.6B, prompt 2,048, G = 4, 1,024 new tokens) for topology x strategy.

    python benchmarks/plan_table.py --out benchmarks/plans            # resumable: finished cells are kept
    python benchmarks/plan_table.py --out benchmarks/plans --report   # the markdown table only

The three paper configs share every shape except the catalogue (nominal 10,000 items each), so one of them
(amazon_video_games) stands for all three. Each cell is `launch plan`'s report, saved as JSON.
"""

import argparse
import json
import sys
from pathlib import Path

TOPOLOGIES = ("v5e-8", "v4-32", "v5p-64")
# strategy -> mesh overrides (data takes the remaining chips)
STRATEGIES = {"dp": ["mesh.data=-1", "mesh.fsdp=1", "mesh.tp=1"],
              "fsdp": ["mesh.data=-1", "mesh.fsdp=8", "mesh.tp=1"],
              "tp": ["mesh.data=-1", "mesh.fsdp=1", "mesh.tp=8"],
              "fsdp_tp": ["mesh.data=-1", "mesh.fsdp=4", "mesh.tp=2"]}


def run(out: Path, config: str, topologies, strategies, extra, programs=None) -> None:
    import jax

    from rporec_jax import config as C
    from rporec_jax import plan as PL

    out.mkdir(parents=True, exist_ok=True)
    for topo in topologies:
        for strategy in strategies:
            cell = out / f"{config}-{topo}-{strategy}.json"
            if cell.exists():
                continue
            cfg = C.load_config(config, [f"strategy={strategy}", *STRATEGIES[strategy], *extra])
            print(f"== {topo} {strategy}", flush=True)
            with jax.default_matmul_precision("default"):
                try:
                    report = PL.plan(cfg, topo, programs=programs, log=lambda s: print(s, flush=True))
                except PL.PlanError as e:
                    report = {"topology": topo, "strategy": strategy, "error": str(e), "rows": []}
            cell.write_text(json.dumps(report, indent=1))


PROGRAMS = ("cot_sampler", "rollout_sampler", "stage1_step", "rechead_scoring", "grpo_update", "sasrec_step")


def _cell(r: dict) -> str:
    gib = 1024 ** 3
    if not r["fits"]:
        return f"**{r['peak_bytes'] / gib:.1f} GiB: no**"
    t = r["time_s"]
    coll = f", {r['collective_bytes'] / 1e9:.1f} GB coll." if r["collective_bytes"] >= 1e8 else ""
    return f"{r['peak_bytes'] / gib:.1f} GiB, {t * 1e3:.1f} ms" if t < 1 else \
        f"{r['peak_bytes'] / gib:.1f} GiB, {t:.2f} s ({r['bound']}{coll})"


def table(out: Path, config: str) -> str:
    """Returns a markdown table, a row per (topology, strategy) and a column per program: per-chip peak
    memory and estimated time (bound and collective bytes for the long programs), or the peak that does not
    fit."""
    lines = ["| topology | strategy | " + " | ".join(PROGRAMS) + " |", "|---|---|" + "---|" * len(PROGRAMS)]
    for topo in TOPOLOGIES:
        for strategy in STRATEGIES:
            cell = out / f"{config}-{topo}-{strategy}.json"
            if not cell.exists():
                continue
            rep = json.loads(cell.read_text())
            if rep.get("error"):
                lines.append(f"| {topo} | {strategy} | {rep['error'][:120]} |" + " |" * (len(PROGRAMS) - 1))
                continue
            rows = {r["program"]: r for r in rep["rows"]}
            lines.append(f"| {topo} | {strategy} (mesh {'x'.join(str(v) for v in rep['mesh'].values())}) | "
                         + " | ".join(_cell(rows[p]) if p in rows else "-" for p in PROGRAMS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/plans")
    ap.add_argument("--config", default="amazon_video_games")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every cell")
    ap.add_argument("--programs", default=None, help="comma list of programs (default: all)")
    ap.add_argument("--report", action="store_true", help="print the table of saved cells, compile nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not args.report:
        run(out, args.config, args.topologies.split(","), args.strategies.split(","), args.set,
            args.programs.split(",") if args.programs else None)
    print(table(out, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
