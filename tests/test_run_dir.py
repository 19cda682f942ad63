"""The run directory's guarantees: the data a run started with is pinned, one live run per directory (a dead
one's lock is ignored), exact resume with the Rechead refresh, a stop honoured in every stage (CoT, stage 1,
SASRec, evaluation) with an exact resume, failed starts that stay relaunchable, and read-only export/recommend."""

import filecmp
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from rporec_jax import config as C
from rporec_jax.launch import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from rporec_jax.pipeline import LOCK, Interrupted, Pipeline
from rporec_jax.run_log import read_metrics, read_samples

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


# ------------------------------------------------------------------------------- stops in every stage

def _signal_after(monkeypatch, owner, attr: str, n: int, sig=signal.SIGTERM) -> None:
    """Makes the `n`-th call of `owner.attr` send a real `sig` to this process as it returns: a controlled point,
    so the stage must stop before its next step (batch) and exit with status 3."""
    real, calls = getattr(owner, attr), itertools.count(1)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if next(calls) == n:
            os.kill(os.getpid(), sig)
        return out
    monkeypatch.setattr(owner, attr, wrapped)


def _copy_run(src: Path, dst: Path, done: list, keep_rows=(), ignore=("tb", "report*", "plots", "eval")) -> Path:
    """Copies the run `src` to `dst` as it was when the stages `done` had finished (rows, logs and samples of
    later stages dropped)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore))
    prog = json.loads((dst / "progress.json").read_text())
    prog.update(done=done, results=[r for r in prog["results"] if r["row"] in keep_rows])
    (dst / "progress.json").write_text(json.dumps(prog))
    for name in ("metrics.jsonl", "samples.jsonl"):
        if (dst / name).exists():
            lines = (dst / name).read_text().splitlines(keepends=True)
            (dst / name).write_text("".join(x for x in lines if json.loads(x)["stage"] in done))
    return dst


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(run: Path) -> list:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in json.loads((run / "progress.json").read_text())
            ["results"]]


def test_sigterm_in_cot_and_stage1_stops_saves_and_resume_repeats_the_run(refresh_run, tmp_path, monkeypatch):
    from rporec_jax import sampling
    from rporec_jax.train import stage1

    # the run as it was before its CoT finished the test split (4 batches)
    run = _copy_run(refresh_run, tmp_path / "run", done=[], ignore=("tb", "report*", "plots", "eval", "ckpt"))
    (run / "cot" / "test" / "test" / "shard-00000.jsonl").unlink()
    args = ["--run_dir", str(run), "--resume", "--stages", "cot,stage1", "--no_progress"]
    with monkeypatch.context() as m:  # SIGTERM during the CoT's second batch: the test shard is left half done
        _signal_after(m, sampling.Sampler, "generate", 2)
        assert main(args) == EXIT_INTERRUPTED
    assert (run / "cot" / "test" / "test" / ".shard-00000.jsonl.partial").exists()
    assert not (run / "cot" / "test" / "test" / "shard-00000.jsonl").exists()
    with monkeypatch.context() as m:  # SIGINT during stage 1's second step (of 4)
        real_make = stage1.make_stage1_step

        def make(*a, **k):
            step, calls = real_make(*a, **k), itertools.count(1)

            def run(state, batch):
                out = step(state, batch)
                if next(calls) == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return out
            return run
        m.setattr(stage1, "make_stage1_step", make)
        assert main(args) == EXIT_INTERRUPTED
    prog = json.loads((run / "progress.json").read_text())
    assert prog["done"] == ["cot"] and (run / "ckpt" / "stage1_resume").is_dir()
    assert not read_metrics(str(run), "stage1")

    assert main(args) == 0
    # the CoT is byte-identical (and no shard past the limits was written), stage 1 logged and scored the same
    want, got = _files(refresh_run / "cot"), _files(run / "cot")
    assert sorted(got) == sorted(want)
    assert all(filecmp.cmp(want[k], got[k], shallow=False) for k in want if "shard" in k)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ("time", "examples_per_s")} for m in ms]  # noqa
    assert strip(read_metrics(str(run), "stage1")) == strip(read_metrics(str(refresh_run), "stage1"))
    assert _rows(run) == [r for r in _rows(refresh_run) if r["row"] == "stage1"]
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["stage1_rechead"]


def test_sigterm_in_sasrec_and_policy_eval_stops_saves_and_resume_repeats_the_run(refresh_run, tmp_path,
                                                                                   monkeypatch):
    from rporec_jax import sampling
    from rporec_jax.baselines import sasrec

    args = ["--resume", "--stages", "eval", "--set", "eval.baselines=sasrec", "--set", "eval.sasrec_epochs=1",
            "--no_progress"]
    want = _copy_run(refresh_run, tmp_path / "want", done=["cot", "stage1", "stage2"], keep_rows=["stage1"])
    assert main(["--run_dir", str(want), *args]) == 0
    run = _copy_run(refresh_run, tmp_path / "run", done=["cot", "stage1", "stage2"], keep_rows=["stage1"])
    with monkeypatch.context() as m:  # in SASRec's third training step
        _signal_after(m, sasrec, "_train_step", 3)
        assert main(["--run_dir", str(run), *args]) == EXIT_INTERRUPTED
    assert (run / "ckpt" / "sasrec_resume").is_dir() and [r["row"] for r in _rows(run)] == ["stage1"] * 2
    with monkeypatch.context() as m:  # SASRec finishes; the policy's second generation batch on valid
        _signal_after(m, sampling.Sampler, "generate", 2)
        assert main(["--run_dir", str(run), *args]) == EXIT_INTERRUPTED
    assert [r["row"] for r in _rows(run)] == ["stage1"] * 2 + ["sasrec"] * 2
    partial = (run / "ckpt" / "policy_eval" / "greedy_valid.jsonl").read_text().splitlines()
    assert len(partial) == 3  # its header and the two batches done
    assert main(["--run_dir", str(run), *args]) == 0
    assert _rows(run) == _rows(want) and [r["row"] for r in _rows(want)] == ["stage1", "stage1", "sasrec", "sasrec",
                                                                             "stage2", "stage2"]
    assert read_samples(str(run), "eval") == read_samples(str(want), "eval")
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["stage1_rechead", "stage2"]


# --------------------------------------------------------------------------- failed starts

def test_a_stage_error_prints_one_line_and_the_failed_start_stays_relaunchable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RPOREC_DATASETS_DIR", str(tmp_path / "datasets"))
    cfgs = {}
    for name, users in (("bad", 0), ("good", 12)):
        _movielens(tmp_path / name, users=users)  # bad: an empty u.data, refused when the data is prepared
        d = C.to_dict(C.load_config("synthetic", ["limits.train=8", "limits.valid=4", "limits.test=4"]))
        d["data"]["source"] = {"kind": "movielens", "root": str(tmp_path / name), "download": False}
        cfgs[name] = tmp_path / f"{name}.json"
        cfgs[name].write_text(json.dumps(d))
    stages = ["--stages", "eval", "--set", "eval.baselines=popular"]  # the cheapest run that prepares the data
    for resume in (False, True):
        run = tmp_path / f"run-{resume}"
        for _ in range(2):  # the same failure twice: the first did not lock the dir into a run
            capsys.readouterr()
            assert main(["--config", str(cfgs["bad"]), *stages, "--run_dir", str(run), "--no_progress"]) \
                == EXIT_BAD_INPUT
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert err.startswith(f"[launch] error in data: {tmp_path / 'bad' / 'u.data'}: has no rating rows")
            log = (run / "run.log").read_text()
            assert "Traceback (most recent call last)" in log and "DataError" in log
        # fixed: a relaunch, or a --resume with the fixed config, both run
        assert main(["--config", str(cfgs["good"]), *stages, "--run_dir", str(run), "--no_progress",
                     *(["--resume"] if resume else [])]) == 0
        assert json.loads((run / "config.json").read_text())["data"]["source"]["root"] == str(tmp_path / "good")
    # a started run is protected as before: no relaunch, no --resume with another config
    assert main(["--config", str(cfgs["bad"]), "--run_dir", str(run), "--no_progress"]) == EXIT_BAD_INPUT
    assert "already holds a run" in capsys.readouterr().err
    assert main(["--config", str(cfgs["bad"]), "--run_dir", str(run), "--resume", "--no_progress"]) == EXIT_BAD_INPUT
    assert "config differs" in capsys.readouterr().err
    # a bad --set on a resume is refused before the run dir is touched
    before = (run / "config.json").read_text()
    assert main(["--run_dir", str(run), "--resume", "--set", "stage1.batch_size=0"]) == EXIT_BAD_INPUT
    assert "stage1.batch_size=0: must be >= 1" in capsys.readouterr().err
    assert (run / "config.json").read_text() == before
