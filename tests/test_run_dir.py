"""The run directory's guarantees: the data a run started with is pinned, one live run per directory (a dead
one's lock is ignored), exact resume with the Rechead refresh, and read-only export/recommend."""

import hashlib
import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from rporec_jax import config as C
from rporec_jax.launch import EXIT_BAD_INPUT, main
from rporec_jax.pipeline import LOCK, Interrupted, Pipeline
from rporec_jax.run_log import read_metrics

FAST = ["--config", "synthetic", "--no_progress", "--set", "stage1.epochs=1"]


@pytest.fixture(scope="module")
def refresh_run(tmp_path_factory):
    """A finished synthetic run through stage 2 with the Rechead refreshed at every step."""
    run_dir = tmp_path_factory.mktemp("runs") / "refresh"
    assert main([*FAST, "--stages", "cot,stage1,stage2", "--set", "stage2.refresh_every=1",
                 "--run_dir", str(run_dir)]) == 0
    return run_dir


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


def test_stopped_and_resumed_refresh_repeats_the_uninterrupted_run(refresh_run, tmp_path):
    # the same run up to the end of stage 1; stage 2 stops after step 2 (checkpoint) and is resumed
    run = tmp_path / "resumed"
    shutil.copytree(refresh_run, run, ignore=shutil.ignore_patterns("stage2", "tb"))
    prog = json.loads((run / "progress.json").read_text())
    (run / "progress.json").write_text(json.dumps({**prog, "done": ["cot", "stage1"]}))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(x for x in lines if json.loads(x)["stage"] == "stage1"))
    cfg = C.from_dict(json.loads((run / "config.json").read_text()))

    pipe = Pipeline(cfg, str(run), resume=True, progress=False,
                    should_stop=lambda: len(read_metrics(str(run), "stage2")) >= 2)
    with pytest.raises(Interrupted):
        pipe.run()
    pipe.close()
    pipe = Pipeline(cfg, str(run), resume=True, progress=False)
    pipe.run()
    pipe.close()
    full = [(m["step"], m["refresh/loss"], m["loss"]) for m in read_metrics(str(refresh_run), "stage2")]
    resumed = [(m["step"], m["refresh/loss"], m["loss"]) for m in read_metrics(str(run), "stage2")]
    assert [s for s, _, _ in resumed] == list(range(1, 7)) and resumed == full


def test_a_live_run_locks_its_dir_and_a_dead_ones_lock_is_ignored(refresh_run, capsys):
    holder = subprocess.Popen(["sleep", "60"])
    lock = refresh_run / LOCK
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert main(["--run_dir", str(refresh_run), "--resume", "--no_progress"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert str(refresh_run) in err and f"pid {holder.pid}" in err and socket.gethostname() in err
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock no longer blocks, and the resumed run removes its own at exit
    assert main(["--run_dir", str(refresh_run), "--resume", "--no_progress"]) == 0
    assert not lock.exists()


def test_export_and_recommend_only_read_the_run_dir(refresh_run, tmp_path):
    before = _snapshot(refresh_run)
    assert main(["export", "--run_dir", str(refresh_run), "--out", str(tmp_path / "hf")]) == 0
    assert list((tmp_path / "hf").glob("*.safetensors"))
    user = next(Pipeline(C.from_dict(json.loads((refresh_run / "config.json").read_text())), str(refresh_run),
                         read_only=True).dataset().records("test"))["user"]
    assert main(["recommend", "--run_dir", str(refresh_run), "--user", str(user)]) == 0
    assert _snapshot(refresh_run) == before


def _movielens(root: Path, users: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    genres = "|0" * 18 + "|1"
    (root / "u.item").write_text("".join(f"{i}|Movie {i} (199{i % 10})|01-Jan-1990||url{genres}\n"
                                         for i in range(1, 13)))
    (root / "u.data").write_text("".join(f"{u}\t{1 + (u + k) % 12}\t4\t{1000 * k + u}\n"
                                         for u in range(1, users + 1) for k in range(8)))


def test_resume_refuses_changed_data_naming_the_change(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RPOREC_DATASETS_DIR", str(tmp_path / "datasets"))
    data = tmp_path / "ml"
    _movielens(data, users=12)
    cfg = C.load_config("synthetic", ["limits.train=8", "limits.valid=4", "limits.test=4"])
    d = C.to_dict(cfg)
    d["data"]["source"] = {"kind": "movielens", "root": str(data), "download": False}
    (tmp_path / "cfg.json").write_text(json.dumps(d))
    run = tmp_path / "run"
    assert main(["--config", str(tmp_path / "cfg.json"), "--stages", "cot", "--no_progress",
                 "--run_dir", str(run)]) == 0
    assert json.loads((run / "progress.json").read_text())["data"]["inputs"]
    _movielens(data, users=11)  # the source file changes under the run
    capsys.readouterr()
    assert main(["--run_dir", str(run), "--resume", "--stages", "cot,stage1", "--no_progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "data changed" in err and str(data / "u.data") in err and str(run) in err
    assert not (run / "ckpt").exists()  # refused before stage 1 ran
