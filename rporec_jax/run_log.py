"""Run logs: what a training run leaves on disk for the user, written by the primary process only.

    with RunLogger(run_dir) as rl:
        rl.log("stage2", step, {"loss": 0.3, "reward/total": 0.7})
        rl.samples("stage2", step, [{"prompt": p, "completion": c, "reward": r, "terms": {...}}])
        rl.summary("stage2", "step 100: reward 0.71")

Layout of `run_dir`:

    metrics.jsonl  one line per `log` call: {"stage", "step", "time" (unix seconds), **metrics}
    samples.jsonl  one line per sample row: {"stage", "step", **row}
    run.log        the `summary` lines, "[stage] text"
    tb/<stage>/    TensorBoard event files (tensorboardX), scalars tagged "<stage>/<name>", one run per stage

Each JSONL line is written with a single `write` and flushed, so a crash loses at most the line being written;
`read_metrics` skips such a truncated last line, and a logger opened on the run again cuts it off before it
appends. The TensorBoard writer is flushed at every `log` too.

Non-finite metric values (NaN, +-inf) are written to JSON as `null` (strict JSON has no NaN; strings such as
"nan" would turn a numeric column into a mixed one). Nothing else is ever written as null, so a null in
metrics.jsonl always means "this value was not finite"; `RunLogger.nonfinite` counts them per
"<stage>/<name>" and the first one of each name is logged as a warning. TensorBoard gets the raw value.

Resuming: `truncate_after(stage, step)` drops that stage's lines past `step` from metrics.jsonl and
samples.jsonl and starts that stage's next TensorBoard file with a purge at `step + 1`, so TensorBoard hides the
stale points the crashed run wrote past the checkpoint. Each stage has its own TensorBoard directory because
a purge applies to a whole TensorBoard run, and stage steps are counted independently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
LOG_FILE = "run.log"
TB_DIR = "tb"
_RESERVED = ("stage", "step", "time")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def jsonable(obj: Any) -> Any:
    """Returns a strict-JSON copy of `obj`: numpy/JAX arrays and scalars become lists and Python numbers,
    tuples become lists, non-finite floats become None, and anything else unknown becomes its `str`."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        try:
            arr = np.asarray(obj)
        except (TypeError, ValueError):  # an object that merely claims to be array-like
            return str(obj)
        return jsonable(arr.tolist())
    return str(obj)


def _scalar(name: str, value: Any) -> int | float:
    """Returns `value` (Python/numpy/JAX scalar or size-1 array) as a Python int (integer or bool dtype) or float."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "biuf":
        raise TypeError(f"metric {name!r} must be a numeric scalar, got {type(value).__name__} "
                        f"with shape {arr.shape} and dtype {arr.dtype}")
    item = arr.reshape(()).item()
    return int(item) if arr.dtype.kind in "biu" else float(item)


def _check_stage(stage: str) -> str:
    # The stage names a TensorBoard directory and a JSON field; keep it a plain path component.
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise ValueError(f"stage must be a non-empty name of letters, digits, '_', '.', '-'; got {stage!r}")
    return stage


def _read_jsonl(path: str) -> list[dict]:
    """Returns the JSON objects of `path`, one per line; a truncated (unparseable) last line is skipped, an
    unparseable line anywhere else raises ValueError. A missing file reads as []."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: skipping truncated last line %d (%s)", path, i + 1, e)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from e
    return out


def read_metrics(run_dir: str, stage: str | None = None) -> list[dict]:
    """Returns the metric lines of `run_dir/metrics.jsonl` in file order (all stages, or only `stage`);
    non-finite values read back as None."""
    rows = _read_jsonl(os.path.join(run_dir, METRICS_FILE))
    return [r for r in rows if stage is None or r.get("stage") == stage]


def read_samples(run_dir: str, stage: str | None = None) -> list[dict]:
    """Returns the sample rows of `run_dir/samples.jsonl` in file order (all stages, or only `stage`)."""
    rows = _read_jsonl(os.path.join(run_dir, SAMPLES_FILE))
    return [r for r in rows if stage is None or r.get("stage") == stage]


def _repair_tail(path: str) -> None:
    """Cuts a crash-truncated last line off `path` (or ends a complete one with its missing newline) so that
    appended lines start on a line of their own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        # Read backwards only as far as the last newline: samples.jsonl may be large.
        cut, tail = end, b""
        while cut > 0 and b"\n" not in tail:
            cut = max(0, cut - (1 << 16))
            f.seek(cut)
            tail = f.read(end - cut)
        cut += tail.rfind(b"\n") + 1  # rfind is -1 when the whole file is one partial line
        f.seek(cut)
        try:
            json.loads(f.read(end - cut).decode("utf-8"))
            f.seek(end)
            f.write(b"\n")
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s: dropping truncated last line left by an earlier run", path)
            f.truncate(cut)


_last_suffix_ns = 0


def _event_file_suffix() -> str:
    """Returns a suffix for a new event file name that sorts after every earlier one of this process."""
    # tensorboardX names event files by the time to the second: a writer reopened within the same second
    # (truncate_after) would overwrite the earlier file, or sort before it so TensorBoard would read the purge
    # marker first. A fixed-width, strictly increasing nanosecond stamp keeps names distinct and in order.
    global _last_suffix_ns
    _last_suffix_ns = max(time.time_ns(), _last_suffix_ns + 1)
    return f".{_last_suffix_ns:020d}.{os.getpid()}"


class RunLogger:
    """Writes a run's metrics, samples and summary lines under `run_dir` (see the module docstring).

    `enabled=None` means "this is process 0" (`jax.process_index() == 0`); a disabled logger creates no
    file or directory and every method returns without doing anything, so all processes may call it.
    """

    def __init__(self, run_dir: str, enabled: bool | None = None, tensorboard: bool = True):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.run_dir = run_dir
        self.enabled = bool(enabled)
        self.tensorboard = bool(tensorboard)
        self.nonfinite: dict[str, int] = {}
        self._files: dict[str, Any] = {}
        self._writers: dict[str, Any] = {}
        self._purge: dict[str, int] = {}
        self._closed = False
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        for name in (METRICS_FILE, SAMPLES_FILE):
            _repair_tail(os.path.join(run_dir, name))

    # -- files -----------------------------------------------------------------------------------------------

    def _active(self) -> bool:
        if self.enabled and self._closed:
            raise RuntimeError(f"RunLogger({self.run_dir!r}) is closed")
        return self.enabled

    def _append(self, name: str, lines: Iterable[str]) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(  # noqa: SIM115 -- kept open across calls
                os.path.join(self.run_dir, name), "a", encoding="utf-8")
        # One write per call: a crash leaves at most the last line partial, never interleaved lines.
        f.write("".join(line + "\n" for line in lines))
        f.flush()

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _writer(self, stage: str):
        """Returns the stage's tensorboardX SummaryWriter (opened on first use), or None with TensorBoard off."""
        if not self.tensorboard:
            return None
        w = self._writers.get(stage)
        if w is None:
            from tensorboardX import SummaryWriter

            w = self._writers[stage] = SummaryWriter(
                os.path.join(self.run_dir, TB_DIR, stage), purge_step=self._purge.pop(stage, None),
                filename_suffix=_event_file_suffix())
        return w

    # -- public API ------------------------------------------------------------------------------------------

    def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one line {"stage", "step", "time", **metrics} to metrics.jsonl and the scalars
        "<stage>/<name>" to TensorBoard. Values: numeric scalars (Python, numpy or JAX)."""
        if not self._active():
            return
        _check_stage(stage)
        step = int(step)
        values = {}
        for name, value in metrics.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved for the line's own {_RESERVED} fields")
            values[str(name)] = _scalar(name, value)
        row: dict[str, Any] = {"stage": stage, "step": step, "time": time.time()}
        for name, v in values.items():
            if isinstance(v, float) and not math.isfinite(v):
                key = f"{stage}/{name}"
                if key not in self.nonfinite:
                    log.warning("run log: %s is %s at step %d (written to metrics.jsonl as null)", key, v, step)
                self.nonfinite[key] = self.nonfinite.get(key, 0) + 1
                v = None
            row[name] = v
        self._append(METRICS_FILE, [json.dumps(row, allow_nan=False)])
        w = self._writer(stage)
        if w is not None:
            for name, v in values.items():
                w.add_scalar(f"{stage}/{name}", float(v), step)
            w.flush()

    def samples(self, stage: str, step: int, rows: list[Mapping[str, Any]]) -> None:
        """Appends `rows` (e.g. {"prompt", "completion", "reward", "terms"}) to samples.jsonl, each with
        "stage" and "step" added, and the first row as TensorBoard text "<stage>/samples"."""
        if not self._active() or not rows:
            return
        _check_stage(stage)
        step = int(step)
        lines = []
        for row in rows:
            clash = [k for k in ("stage", "step") if k in row]
            if clash:
                raise ValueError(f"sample rows must not carry {clash}: the logger adds them")
            lines.append(json.dumps({"stage": stage, "step": step, **jsonable(row)}, allow_nan=False,
                                    ensure_ascii=False))
        self._append(SAMPLES_FILE, lines)
        w = self._writer(stage)
        if w is not None:
            # TensorBoard renders text as markdown; a code block keeps prompts and completions verbatim.
            text = json.dumps(jsonable(rows[0]), indent=2, ensure_ascii=False)
            w.add_text(f"{stage}/samples", "```\n" + text.replace("```", "'''") + "\n```", step)
            w.flush()

    def summary(self, stage: str, text: str) -> None:
        """Prints "[stage] text" to stdout and appends it to run.log."""
        if not self._active():
            return
        line = f"[{stage}] {text}"
        print(line, file=sys.stdout, flush=True)
        self._append(LOG_FILE, [line])

    def truncate_after(self, stage: str, step: int) -> dict[str, int]:
        """Returns {file name: lines dropped} after rewriting metrics.jsonl and samples.jsonl without `stage`'s
        lines whose step > `step` (other stages' lines are kept); TensorBoard hides that stage's points from
        step + 1 on that an earlier run wrote (the purge marker opens the stage's next event file)."""
        if not self._active():
            return {}
        _check_stage(stage)
        step = int(step)
        self._close_files()
        dropped = {}
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = os.path.join(self.run_dir, name)
            rows = _read_jsonl(path)
            keep = [r for r in rows if r.get("stage") != stage or int(r.get("step", -1)) <= step]
            dropped[name] = len(rows) - len(keep)
            if not os.path.exists(path):
                continue
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in keep))
            os.replace(tmp, path)  # atomic: a crash here leaves either the old or the new file
        if self.tensorboard:
            old = self._writers.pop(stage, None)
            if old is not None:
                old.close()
            self._purge[stage] = step + 1
            # Open the new writer now: the purge marker must reach disk even if the stage logs nothing more.
            self._writer(stage).flush()
        return dropped

    def close(self) -> None:
        """Flushes and closes every file and TensorBoard writer; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._close_files()
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
