"""Run logs: JSONL round trip, crash-truncated lines, resume truncation, TensorBoard events, disabled logger."""

import glob
import json
import os
import pathlib
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rporec_jax.run_log import RunLogger, read_metrics, read_samples


def _tb_events(logdir):
    """Returns [(file, Event)] of every TensorBoard event file under `logdir`, files in name order (the order
    TensorBoard reads them). Parses the TFRecord framing directly: u64 length, u32 crc, data, u32 crc."""
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = pathlib.Path(path).read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            out.append((os.path.basename(path), ev))
            pos += 12 + n + 4
    return out


def _tb_scalars(logdir):
    return [(v.tag, e.step, v.simple_value) for _, e in _tb_events(logdir) for v in e.summary.value
            if v.HasField("simple_value")]


def test_jsonl_round_trip_and_tensorboard(tmp_path):
    run = str(tmp_path / "run")
    with RunLogger(run, enabled=True) as rl:
        rl.log("stage1", 1, {"loss": 2.5, "lr": np.float32(1e-3), "tokens": np.int64(7)})
        rl.log("stage1", 2, {"loss": 2.0, "lr": np.float32(1e-3), "tokens": 9})
        rl.log("stage2", 1, {"reward/total": np.array(0.25), "kl": float("nan"), "x": float("inf")})
    rows = read_metrics(run)
    assert [(r["stage"], r["step"]) for r in rows] == [("stage1", 1), ("stage1", 2), ("stage2", 1)]
    assert rows[0]["loss"] == 2.5 and rows[0]["tokens"] == 7 and isinstance(rows[0]["tokens"], int)
    assert rows[0]["lr"] == pytest.approx(1e-3)
    assert all(abs(r["time"] - rows[0]["time"]) < 60 for r in rows)
    # non-finite -> null, and counted
    assert rows[2]["reward/total"] == 0.25 and rows[2]["kl"] is None and rows[2]["x"] is None
    assert rl.nonfinite == {"stage2/kl": 1, "stage2/x": 1}
    assert [r["step"] for r in read_metrics(run, "stage2")] == [1]
    # every line is strict JSON (no NaN literals)
    for line in pathlib.Path(run, "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    s1 = _tb_scalars(os.path.join(run, "tb", "stage1"))
    assert ("stage1/loss", 1, 2.5) in s1 and ("stage1/loss", 2, 2.0) in s1 and ("stage1/tokens", 2, 9.0) in s1
    s2 = _tb_scalars(os.path.join(run, "tb", "stage2"))
    assert ("stage2/reward/total", 1, 0.25) in s2
    assert any(t == "stage2/kl" and np.isnan(v) for t, _, v in s2)  # TensorBoard gets the raw value


def test_crash_truncated_last_line_is_skipped_and_repaired(tmp_path):
    run = str(tmp_path / "run")
    with RunLogger(run, enabled=True, tensorboard=False) as rl:
        rl.log("stage1", 1, {"loss": 1.0})
        rl.log("stage1", 2, {"loss": 0.5})
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"stage": "stage1", "step": 3, "lo')  # the process died mid-line
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    # a resumed logger cuts the partial line off before appending, so the next line is not glued onto it
    with RunLogger(run, enabled=True, tensorboard=False) as rl:
        rl.log("stage1", 3, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    # a broken line that is not the last one is corruption, not a crash: it raises
    with open(path, "a") as f:
        f.write("garbage\n" + json.dumps({"stage": "stage1", "step": 4, "loss": 0.1}) + "\n")
    with pytest.raises(ValueError, match="line 4"):
        read_metrics(run)


def test_truncate_after_drops_only_that_stage_past_the_step(tmp_path):
    run = str(tmp_path / "run")
    with RunLogger(run, enabled=True) as rl:
        for s in (1, 2, 3):
            rl.log("stage1", s, {"loss": float(s)})
        for s in (1, 2, 3, 4, 5):
            rl.log("stage2", s, {"reward/total": float(s)})
            rl.samples("stage2", s, [{"completion": f"c{s}", "reward": float(s)}])
        rl.samples("stage1", 3, [{"completion": "s1"}])
    with RunLogger(run, enabled=True) as rl:  # the resumed run, restored at stage-2 step 3
        assert rl.truncate_after("stage2", 3) == {"metrics.jsonl": 2, "samples.jsonl": 2}
        assert [(r["stage"], r["step"]) for r in read_metrics(run)] == (
            [("stage1", 1), ("stage1", 2), ("stage1", 3), ("stage2", 1), ("stage2", 2), ("stage2", 3)])
        rl.log("stage2", 4, {"reward/total": 40.0})
        rl.samples("stage2", 4, [{"completion": "new"}])
    m = read_metrics(run, "stage2")
    assert [(r["step"], r["reward/total"]) for r in m] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [(r["stage"], r["step"], r["completion"]) for r in read_samples(run)] == (
        [("stage2", 1, "c1"), ("stage2", 2, "c2"), ("stage2", 3, "c3"), ("stage1", 3, "s1"), ("stage2", 4, "new")])
    # TensorBoard: the stage-2 run's newest file starts with a purge at step 4; stage 1 gets none
    events = _tb_events(os.path.join(run, "tb", "stage2"))
    files = sorted({f for f, _ in events})
    assert len(files) == 2
    purges = [(f, e.step) for f, e in events if e.HasField("session_log") and e.session_log.status == 1]
    assert purges == [(files[-1], 4)]
    assert ("stage2/reward/total", 4, 40.0) in _tb_scalars(os.path.join(run, "tb", "stage2"))
    assert not [e for _, e in _tb_events(os.path.join(run, "tb", "stage1")) if e.HasField("session_log")]


def test_samples_and_summary(tmp_path, capsys):
    run = str(tmp_path / "run")
    with RunLogger(run, enabled=True) as rl:
        rl.samples("stage2", 7, [{"prompt": "p", "completion": "c|d", "reward": np.float32(0.5),
                                  "terms": {"format": np.array(1.0), "rank": np.int32(3), "x": float("nan")}},
                                 {"prompt": "q", "completion": "e", "reward": 0.0, "terms": {}}])
        rl.summary("stage2", "step 7: reward 0.25")
    rows = read_samples(run)
    assert rows[0] == {"stage": "stage2", "step": 7, "prompt": "p", "completion": "c|d", "reward": 0.5,
                       "terms": {"format": 1.0, "rank": 3, "x": None}}
    assert rows[1]["prompt"] == "q"
    assert capsys.readouterr().out == "[stage2] step 7: reward 0.25\n"
    assert pathlib.Path(run, "run.log").read_text() == "[stage2] step 7: reward 0.25\n"
    texts = [v for _, e in _tb_events(os.path.join(run, "tb", "stage2")) for v in e.summary.value
             if v.tag.startswith("stage2/samples")]
    assert len(texts) == 1 and b"c|d" in texts[0].tensor.string_val[0]


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    with RunLogger(str(run), enabled=False) as rl:
        rl.log("stage1", 1, {"loss": 1.0})
        rl.samples("stage1", 1, [{"prompt": "p"}])
        rl.summary("stage1", "hello")
        assert rl.truncate_after("stage1", 0) == {}
    rl.log("stage1", 2, {"loss": 1.0})  # still a no-op after close
    assert not run.exists()
    assert capsys.readouterr().out == ""


def test_bad_metrics_and_closed_logger_raise(tmp_path):
    rl = RunLogger(str(tmp_path / "run"), enabled=True, tensorboard=False)
    with pytest.raises(ValueError, match="reserved"):
        rl.log("stage1", 1, {"step": 1.0})
    with pytest.raises(TypeError, match="numeric scalar"):
        rl.log("stage1", 1, {"loss": np.zeros(3)})
    with pytest.raises(TypeError, match="numeric scalar"):
        rl.log("stage1", 1, {"loss": "high"})
    with pytest.raises(ValueError, match="stage"):
        rl.log("stage/1", 1, {"loss": 1.0})
    rl.close()
    rl.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        rl.log("stage1", 1, {"loss": 1.0})
    assert read_metrics(str(tmp_path / "run")) == []
    assert not (tmp_path / "run" / "tb").exists()
