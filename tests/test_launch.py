"""`python -m rporec_jax.launch` on the synthetic config: the whole pipeline, its report, preemption + resume,
early config errors, export and recommend."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rporec_jax.launch import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from rporec_jax.run_log import read_metrics

FAST = ["--config", "synthetic", "--no_progress", "--set", "eval.baselines=popular"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    assert main([*FAST, "--run_dir", str(run_dir)]) == 0
    return run_dir


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "wall_s"} for r in rows]


def test_report_has_every_row_and_the_training_curves(full_run):
    report = json.loads((full_run / "report.json").read_text())
    rows = {(r["row"], r["split"]) for r in report["results"]}
    assert rows == {(n, s) for n in ("popular", "stage1", "stage2") for s in ("valid", "test")}
    for r in report["results"]:
        assert all(0 <= r[k] <= 1 for k in ("ndcg@5", "ndcg@10", "ndcg@20", "hr@5", "hr@10", "hr@20"))
    s2 = report["stage2"]
    for k in ("reward_mean_first", "reward_mean_last", "format_rate_first", "format_rate_last"):
        assert isinstance(s2[k], float)
    assert {"plots/stage1_loss.png", "plots/stage2_rewards.png", "plots/stage2_kl.png"} <= set(report["plots"])
    assert len(read_metrics(str(full_run), "stage2")) == 6 and read_metrics(str(full_run), "stage1")
    assert (full_run / "report.md").read_text().count("| stage2 |") == 1
    assert any((full_run / "tb").rglob("events.out.tfevents*")) and (full_run / "samples.jsonl").exists()
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["name"] == "synthetic" and cfg["eval"]["baselines"] == ["popular"]


def test_sigterm_saves_and_resume_repeats_the_uninterrupted_run(full_run, tmp_path):
    # the same run up to the end of stage 1, then stage 2 is preempted by SIGTERM and resumed
    run = tmp_path / "resumed"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("stage2", "report*", "plots", "tb"))
    prog = json.loads((run / "progress.json").read_text())
    prog.update(done=["cot", "stage1"], results=[r for r in prog["results"] if r["row"] == "stage1"])
    (run / "progress.json").write_text(json.dumps(prog))
    for name in ("metrics.jsonl", "samples.jsonl"):
        lines = (run / name).read_text().splitlines(keepends=True)
        (run / name).write_text("".join(x for x in lines if json.loads(x)["stage"] == "stage1"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "rporec_jax.launch", "--run_dir", str(run), "--resume",
                             "--no_progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(str(run), "stage2")) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "--resume" in out and list((run / "ckpt" / "stage2").iterdir())
    done_steps = len(read_metrics(str(run), "stage2"))
    assert 2 <= done_steps < 6

    assert main(["--run_dir", str(run), "--resume", "--no_progress"]) == 0
    full = json.loads((full_run / "report.json").read_text())
    resumed = json.loads((run / "report.json").read_text())
    assert _comparable(resumed["results"]) == _comparable(full["results"])
    a = [{k: v for k, v in m.items() if not k.startswith("time")} for m in read_metrics(str(full_run), "stage2")]
    b = [{k: v for k, v in m.items() if not k.startswith("time")} for m in read_metrics(str(run), "stage2")]
    assert [m["step"] for m in b] == list(range(1, 7)) and a == b


@pytest.mark.parametrize("override,message", [
    ("stage2.loss.beta=-1", "beta"),
    ("stage2.nosuchfield=1", "nosuchfield"),
    ("backbone.path=/does/not/exist", "/does/not/exist"),
    ("stages=stage2,cot", "order"),
    # every section's ranges, the mesh against the devices (8 fake CPUs here), every path the run reads
    ("stage1.batch_size=0", "stage1.batch_size=0: must be >= 1"),
    ("data.num_negatives=-3", "data.num_negatives=-3: must be >= 0"),
    ("stage2.optim.lr=-1", "stage2.optim.lr=-1.0: must be > 0"),
    ("mesh.data=16", "needs 16 devices, but 8 are available"),
    ("cot.teacher=/no/teacher", "cot.teacher='/no/teacher' does not exist"),
])
def test_bad_config_fails_before_heavy_work(override, message, tmp_path, capsys):
    t = time.time()
    assert main(["--config", "synthetic", "--run_dir", str(tmp_path / "r"), "--set", override,
                 "--no_preflight"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and time.time() - t < 10, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("source,message", [
    ({"kind": "movielens", "root": "{tmp}/nowhere", "download": False}, "data.source.root='{tmp}/nowhere': no such"),
    ({"kind": "lcrec", "root": "{tmp}"}, "{tmp}: expected exactly one *.inter.json (found 0)"),
    ({"kind": "lcrec", "root": "{tmp}", "prefix": "X"}, "{tmp}/X.inter.json does not exist"),
])
def test_missing_data_files_fail_before_the_run_dir_is_written(source, message, tmp_path, capsys):
    from rporec_jax import config as C

    d = C.to_dict(C.load_config("synthetic"))
    d["data"]["source"] = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in source.items()}
    if d["data"]["source"]["kind"] == "lcrec":
        d["data"]["split"]["kind"] = "leave_one_out"
    (tmp_path / "cfg.json").write_text(json.dumps(d))
    assert main(["--config", str(tmp_path / "cfg.json"), "--run_dir", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_changed_config(full_run, capsys):
    assert main(["--run_dir", str(full_run), "--resume", "--set", "stage2.steps=7"]) == EXIT_BAD_INPUT
    assert "stage2.steps" in capsys.readouterr().err


def test_export_and_recommend(full_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--run_dir", str(full_run), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert list(out.glob("*.safetensors"))
    from rporec_jax.config import from_dict
    from rporec_jax.data import load_dataset

    ds = load_dataset(from_dict(json.loads((full_run / "config.json").read_text())).data)
    user = next(ds.records("test"))["user"]
    assert main(["recommend", "--run_dir", str(full_run), "--user", str(user), "--split", "test"]) == 0
    text = capsys.readouterr().out
    assert "reasoning:" in text and text.count("\n 1. [") + text.count("\n10. [") == 2


def test_nonfinite_loss_stops_with_status_2_and_keeps_the_last_checkpoint(full_run, tmp_path, monkeypatch, capsys):
    from rporec_jax.train import stage2

    run = tmp_path / "nan"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("stage2", "report*", "plots", "tb"))
    prog = json.loads((run / "progress.json").read_text())
    prog.update(done=["cot", "stage1"], results=[r for r in prog["results"] if r["row"] == "stage1"])
    (run / "progress.json").write_text(json.dumps(prog))
    real_step = stage2.GRPOTrainer.step

    def poisoned(self, state, step):
        state, metrics, samples = real_step(self, state, step)
        return state, {**metrics, "loss": float("nan")}, samples

    monkeypatch.setattr(stage2.GRPOTrainer, "step", poisoned)
    assert main(["--run_dir", str(run), "--resume", "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "stage 2 step" in err and "loss is nan" in err
    # nothing was saved from the poisoned state (the last good checkpoint, here none yet, stays the latest)
    assert not [p for p in (run / "ckpt" / "stage2").iterdir() if p.name.isdigit()]
