"""End-of-run report: report.json shape, row validation, curve summary numbers, PNG plots, report.md table."""

import json

import numpy as np
import pytest

from rporec_jax.report import (
    METRICS,
    curve_summary,
    stage2_summary,
    validate_results,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(name, split, base):
    return {"row": name, "split": split, **{m: base + i / 100 for i, m in enumerate(METRICS)}}


RESULTS = [_row("popular", "valid", 0.01), _row("popular", "test", 0.02), _row("stage1", "valid", 0.10),
           {**_row("stage1", "test", 0.12), "wall_s": 12.5, "device": "cpu"}, _row("stage2", "test", 0.2)]
META = {"run_name": "tiny-run", "config": "tiny", "dataset": "toys", "backbone": "smollm2-135m",
        "devices": "1x cpu", "wall_s": 3725, "seed": 0}


def _stage2_history(n=20):
    """n steps of reward/total = step index 0..n-1 and format rate 0 -> 1."""
    return [{"stage": "stage2", "step": i + 1, "reward/total": float(i), "reward/format": i / (n - 1),
             "reward/prob": 0.5, "reward/rank": 100.0 - i, "kl": 0.01 * i, "completion_length": 50.0 + i}
            for i in range(n)]


def _stage1_history():
    h = [{"stage": "stage1", "step": s, "loss": 3.0 / s} for s in range(1, 11)]
    h[4]["valid_ndcg@10"] = 0.05
    h[9]["valid_ndcg@10"] = 0.08
    return h


def test_curve_summary_known_history():
    h = _stage2_history(20)
    assert curve_summary(h, "reward/total") == (0.5, 18.5)  # mean(0, 1), mean(18, 19)
    assert curve_summary(h[:5], "reward/total") == (0.0, 4.0)  # 10% of 5 rounds down, but at least one step
    assert curve_summary(h, "reward/total", frac=0.5) == (4.5, 14.5)
    # 10% of 30 is 3 steps, not 4 (0.1 * 30 = 3.0000000000000004 in floats)
    assert curve_summary([{"step": i, "r": float(i)} for i in range(30)], "r") == (1.0, 28.0)
    # ordered by step, missing and non-finite values skipped
    shuffled = [{"step": 3, "r": 30.0}, {"step": 1, "r": 10.0}, {"step": 2, "r": None}, {"step": 4, "r": np.nan},
                {"step": 5}]
    assert curve_summary(shuffled, "r", frac=0.5) == (10.0, 30.0)
    assert curve_summary(h, "absent") == (None, None)
    with pytest.raises(ValueError, match="frac"):
        curve_summary(h, "reward/total", frac=0.0)
    s = stage2_summary(h)
    assert s["steps"] == 20 and s["reward_mean_first"] == 0.5 and s["reward_mean_last"] == 18.5
    assert s["format_rate_first"] == pytest.approx(0.5 / 19) and s["format_rate_last"] == pytest.approx(18.5 / 19)
    assert stage2_summary([]) == {} and stage2_summary(None) == {}


def test_write_report_files_and_shape(tmp_path):
    run = tmp_path / "run"
    hist = {"stage1": _stage1_history(), "stage2": _stage2_history()}
    rep = write_report(str(run), RESULTS, META, hist)
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk == rep
    assert list(rep) == ["meta", "results", "stage2", "plots"]
    assert rep["meta"] == META
    assert [(r["row"], r["split"]) for r in rep["results"]] == [(r["row"], r["split"]) for r in RESULTS]
    assert rep["results"][3]["wall_s"] == 12.5 and rep["results"][3]["device"] == "cpu"
    assert all(isinstance(r[m], float) for r in rep["results"] for m in METRICS)
    assert rep["stage2"]["reward_mean_first"] == 0.5 and rep["stage2"]["reward_mean_last"] == 18.5
    assert rep["plots"] == ["plots/stage1_loss.png", "plots/stage1_valid_ndcg10.png", "plots/stage2_rewards.png",
                            "plots/stage2_format_rate.png", "plots/stage2_kl.png",
                            "plots/stage2_completion_length.png"]
    for rel in rep["plots"]:
        data = (run / rel).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, rel

    md = (run / "report.md").read_text()
    assert md.startswith("# RPORec run report: tiny-run\n")
    for text in ("| config | tiny |", "| dataset | toys |", "| backbone | smollm2-135m |", "| devices | 1x cpu |",
                 "| total wall time | 1h 02m 05s |", "| seed | 0 |"):
        assert text in md, text
    # the results table: one line per row, valid then test metrics, 4 decimals, missing split as a dash
    header = "| row | " + " | ".join(f"{s} {m.upper()}" for s in ("valid", "test") for m in METRICS) + " |"
    assert header in md
    lines = md.splitlines()
    popular = next(x for x in lines if x.startswith("| popular |"))
    assert popular.split(" | ")[1:3] == ["0.0100", "0.0200"] and "0.0300" in popular
    stage2 = next(x for x in lines if x.startswith("| stage2 |"))
    assert stage2.count("–") == 6 and "**0.2000**" in stage2  # no valid row; best test NDCG@5 in bold
    assert "| mean reward (reward/total) | 0.5000 | 18.5000 |" in md
    for rel in rep["plots"]:
        assert f"]({rel})" in md


def test_missing_histories_skip_plots_and_stage2(tmp_path):
    run = tmp_path / "run"
    first = write_report(str(run), RESULTS, META, {"stage2": [{"step": 1, "kl": 0.5}]})
    assert first["plots"] == ["plots/stage2_kl.png"]
    rep = write_report(str(run), RESULTS[:2], {"run_name": "r"}, {"stage1": [{"step": 1, "loss": 1.0}]})
    assert rep["stage2"] == {} and rep["plots"] == ["plots/stage1_loss.png"]
    # plots from the earlier report that no longer have data are removed with it
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["stage1_loss.png"]
    md = (run / "report.md").read_text()
    assert "No stage-2 history." in md and "| dataset | n/a |" in md and "| total wall time | n/a |" in md
    rep = write_report(str(tmp_path / "empty"), [], {}, None)
    assert rep == {"meta": {}, "results": [], "stage2": {}, "plots": []}


@pytest.mark.parametrize("row, match", [
    ({k: v for k, v in _row("sasrec", "test", 0.1).items() if k != "hr@10"}, r"'sasrec'.*missing key 'hr@10'"),
    ({k: v for k, v in _row("sasrec", "test", 0.1).items() if k != "row"}, r"missing key 'row'"),
    ({**_row("sasrec", "train", 0.1)}, r"'sasrec'.*'split'"),
    ({**_row("sasrec", "test", 0.1), "ndcg@5": "0.1"}, r"'sasrec'.*'ndcg@5'"),
    ({**_row("sasrec", "test", 0.1), "ndcg@5": None}, r"'sasrec'.*'ndcg@5'"),
    ({**_row("sasrec", "test", 0.1), "hr@20": float("nan")}, r"'sasrec'.*'hr@20'"),
    ({**_row("sasrec", "test", 0.1), "hr@20": 12.0}, r"'sasrec'.*'hr@20'.*\[0, 1\]"),
    (_row("stage1", "test", 0.1), r"'stage1'.*twice"),
])
def test_invalid_rows_raise_and_write_nothing(tmp_path, row, match):
    with pytest.raises(ValueError, match=match):
        write_report(str(tmp_path / "run"), [*RESULTS, row], META, {})
    assert not (tmp_path / "run" / "report.json").exists()


def test_validate_results_accepts_numpy_numbers():
    row = {"row": "stage1", "split": "valid", **{m: np.float32(0.25) for m in METRICS}, "count": np.int64(9)}
    (out,) = validate_results([row])
    assert out["ndcg@10"] == 0.25 and type(out["ndcg@10"]) is float and out["count"] == 9
    json.dumps(out)
