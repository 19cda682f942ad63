"""The end-of-run report: report.json (machine-readable), report.md (for people) and PNG plots of the curves.

    report = write_report(run_dir, results, meta, {"stage1": read_metrics(run_dir, "stage1"),
                                                   "stage2": read_metrics(run_dir, "stage2")})

report.json always has the same shape:

    {"meta": {...},                     # as given; report.md reads run_name, config, dataset, backbone,
                                        # devices and wall_s (seconds) from it and lists any other key
     "results": [{"row": "stage1", "split": "test", "ndcg@5": ..., ..., "hr@20": ..., **extra}, ...],
     "stage2": {"steps", "frac", "reward_mean_first", "reward_mean_last",
                "format_rate_first", "format_rate_last"} or {} without a stage-2 history,
     "plots": ["plots/stage1_loss.png", ...]}   # relative to run_dir, only the plots that had data

Non-finite numbers are written as null (strict JSON), as in metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rporec_jax.run_log import jsonable

METRICS = ("ndcg@5", "ndcg@10", "ndcg@20", "hr@5", "hr@10", "hr@20")
SPLITS = ("valid", "test")
PLOT_DIR = "plots"
CURVE_FRAC = 0.1

# (file, history, title, y label, keys); keys None = every "reward/" key except the per-sample rank.
PLOTS = (
    ("stage1_loss.png", "stage1", "Stage 1: training loss", "sampled-softmax CE", ("loss",)),
    ("stage1_valid_ndcg10.png", "stage1", "Stage 1: validation NDCG@10", "NDCG@10", ("valid_ndcg@10",)),
    ("stage2_rewards.png", "stage2", "Stage 2: mean rewards per step", "mean reward", None),
    ("stage2_format_rate.png", "stage2", "Stage 2: format rate", "fraction well-formed", ("reward/format",)),
    ("stage2_kl.png", "stage2", "Stage 2: KL to the reference policy", "KL", ("kl",)),
    ("stage2_completion_length.png", "stage2", "Stage 2: completion length", "tokens", ("completion_length",)),
)


def _finite(value: Any) -> float | None:
    """Returns `value` as a finite float, or None when it is missing, non-numeric or not finite."""
    if value is None or isinstance(value, (bool, np.bool_, str)):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def validate_results(results: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Returns `results` as JSON-ready rows with the six metrics as floats; raises ValueError naming the row
    and the key when a row lacks "row", has a split outside ("valid", "test"), or lacks a metric or holds
    one that is not a number in [0, 1], and on a repeated (row, split) pair."""
    out, seen = [], set()
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise TypeError(f"results[{i}] must be a dict, got {type(r).__name__}")
        name = r.get("row")
        if not isinstance(name, str) or not name:
            raise ValueError(f"results[{i}]: missing key 'row' (a non-empty name such as 'stage1')")
        split = r.get("split")
        if split not in SPLITS:
            raise ValueError(f"results row {name!r}: key 'split' must be one of {SPLITS}, got {split!r}")
        if (name, split) in seen:
            raise ValueError(f"results row {name!r}: split {split!r} given twice")
        seen.add((name, split))
        row = {"row": name, "split": split}
        for k in METRICS:
            if k not in r:
                raise ValueError(f"results row {name!r} ({split}): missing key {k!r}")
            v = _finite(r[k])
            # Both metrics are fractions of users; a value outside [0, 1] is a percentage or a bug upstream.
            if v is None or not 0.0 <= v <= 1.0:
                raise ValueError(f"results row {name!r} ({split}): key {k!r} must be a float in [0, 1], "
                                 f"got {r[k]!r}")
            row[k] = v
        row.update({k: jsonable(v) for k, v in r.items() if k not in row})
        out.append(row)
    return out


def _values(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Returns (steps, values) of the history entries whose `key` is a finite number, ordered by step; an
    entry without "step" is placed by its index in the history."""
    pts = [(_finite(h.get("step", i)), _finite(h.get(key))) for i, h in enumerate(history)]
    pts = [(float(i) if s is None else s, v) for i, (s, v) in enumerate(pts)]
    pts = sorted(((s, v) for s, v in pts if v is not None), key=lambda p: p[0])  # stable: equal steps keep order
    return [s for s, _ in pts], [v for _, v in pts]


def curve_summary(history: Sequence[Mapping[str, Any]], key: str,
                  frac: float = CURVE_FRAC) -> tuple[float | None, float | None]:
    """Returns (first, last): the means of `key` over the first and the last floor(frac * n) of the n steps
    that logged it (at least one step each), or (None, None) when no step has a finite value."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    _, ys = _values(history, key)
    if not ys:
        return None, None
    # The epsilon keeps 0.1 * 30 = 3.0000000000000004 at 3 steps.
    k = max(1, math.floor(frac * len(ys) + 1e-9))
    return float(np.mean(ys[:k])), float(np.mean(ys[-k:]))


def stage2_summary(history: Sequence[Mapping[str, Any]] | None, frac: float = CURVE_FRAC) -> dict:
    """Returns the stage-2 curve summary ({} without a history): mean total reward and format rate over the
    first and last `frac` of the logged steps, and the number of logged steps."""
    if not history:
        return {}
    reward = curve_summary(history, "reward/total", frac)
    fmt = curve_summary(history, "reward/format", frac)
    return {"steps": len(history), "frac": frac,
            "reward_mean_first": reward[0], "reward_mean_last": reward[1],
            "format_rate_first": fmt[0], "format_rate_last": fmt[1]}


def _plot_keys(history: Sequence[Mapping[str, Any]], keys: tuple[str, ...] | None) -> list[str]:
    if keys is not None:
        return list(keys)
    found = {}
    for h in history:
        found.update((k, None) for k in h if k.startswith("reward/") and k != "reward/rank")
    return list(found)  # first-appearance order, so colours follow the logging order


def write_plots(run_dir: str, histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Returns the paths (relative to `run_dir`) of the PNG plots written under `run_dir/plots/`; a plot
    whose data is absent is skipped, and a stale file of that name from an earlier report removed."""
    # Figure + the Agg canvas directly, not pyplot: no global backend switch and no GUI in a notebook.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plot_dir = os.path.join(run_dir, PLOT_DIR)
    written = []
    for fname, stage, title, ylabel, keys in PLOTS:
        history = histories.get(stage) or []
        series = [(k, *_values(history, k)) for k in _plot_keys(history, keys)]
        series = [s for s in series if s[1]]
        path = os.path.join(plot_dir, fname)
        if not series:
            if os.path.exists(path):
                os.remove(path)
            continue
        os.makedirs(plot_dir, exist_ok=True)
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, xs, ys in series:
            ax.plot(xs, ys, label=key, marker="." if len(xs) <= 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
        # Fixed margins instead of tight_layout: same look for one-line titles, and half the drawing time.
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
        fig.savefig(path, format="png")
        written.append(f"{PLOT_DIR}/{fname}")
    return written


def _md(value: Any) -> str:
    """Returns `value` as one markdown table cell."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _wall(seconds: Any) -> str:
    s = _finite(seconds)
    if s is None:
        return "n/a"
    s = round(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """Returns report.md's text for a report dict of `write_report`'s shape."""
    meta = report["meta"]
    lines = [f"# RPORec run report: {_md(meta.get('run_name', 'unnamed run'))}", "", "| | |", "|---|---|"]
    shown = {"run_name": None, "config": "config", "dataset": "dataset", "backbone": "backbone",
             "devices": "devices", "wall_s": "total wall time"}
    for key, label in shown.items():
        if label is not None:
            lines.append(f"| {label} | {_wall(meta.get(key)) if key == 'wall_s' else _md(meta.get(key, 'n/a'))} |")
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in meta.items() if k not in shown]

    rows = report["results"]
    note = "Full ranking over all items; one relevant item per user. Best per column in bold."
    lines += ["", "## Results", "", note, ""]
    if rows:
        cols = [(s, m) for s in SPLITS for m in METRICS]
        by = {(r["row"], r["split"]): r for r in rows}
        names = list(dict.fromkeys(r["row"] for r in rows))
        best = {c: max((by[(n, c[0])][c[1]] for n in names if (n, c[0]) in by), default=None) for c in cols}
        lines.append("| row | " + " | ".join(f"{s} {m.upper()}" for s, m in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for n in names:
            cells = []
            for s, m in cols:
                r = by.get((n, s))
                cell = "–" if r is None else f"{r[m]:.4f}"
                cells.append(f"**{cell}**" if r is not None and r[m] == best[(s, m)] and len(names) > 1 else cell)
            lines.append(f"| {_md(n)} | " + " | ".join(cells) + " |")
    else:
        lines.append("No results.")

    s2 = report["stage2"]
    lines += ["", "## Stage 2 training curve", ""]
    if s2:
        pct = f"{s2['frac']:.0%}"
        lines += [f"Means over the first and last {pct} of the {s2['steps']} logged steps.", "",
                  f"| metric | first {pct} | last {pct} |", "|---|---:|---:|",
                  f"| mean reward (reward/total) | {_num(s2['reward_mean_first'])} | {_num(s2['reward_mean_last'])} |",
                  f"| format rate (reward/format) | {_num(s2['format_rate_first'])} | {_num(s2['format_rate_last'])} |"]
    else:
        lines.append("No stage-2 history.")

    lines += ["", "## Plots", ""]
    titles = {f"{PLOT_DIR}/{p[0]}": p[2] for p in PLOTS}
    for rel in report["plots"]:
        title = titles.get(rel, rel)
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    if not report["plots"]:
        lines.append("No curves were logged.")
    return "\n".join(lines).rstrip("\n") + "\n"


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # a reader never sees half a report


def write_report(run_dir: str, results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                 histories: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict:
    """Returns the report dict after writing run_dir/report.json, run_dir/report.md and the plots under
    run_dir/plots/. `results` rows are validated first (ValueError), so a bad row writes nothing."""
    rows = validate_results(results)
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    histories = histories or {}
    os.makedirs(run_dir, exist_ok=True)
    report = {"meta": jsonable(dict(meta)), "results": rows, "stage2": stage2_summary(histories.get("stage2")),
              "plots": write_plots(run_dir, histories)}
    report = jsonable(report)
    _write_text(os.path.join(run_dir, "report.json"), json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_text(os.path.join(run_dir, "report.md"), render_markdown(report))
    return report
