"""Stopping a stage between steps and continuing it exactly: the `Stopped` exception and a mid-stage resume state.

A stage polls `should_stop()` (set by SIGTERM/SIGINT, see `rporec_jax.launch.StopFlag`) before each step, batch
or row. When it is set, the stage saves what it needs to continue and raises `Stopped`; the pipeline turns that
into exit status 3. Stages whose steps are driven by (seed, position) alone (stage 1, SASRec) save a resume state
here: an orbax checkpoint of their arrays plus a JSON record of their loop position and history, sealed with the
sha256 manifest of `ckpt_integrity`. Continuing from it repeats the uninterrupted run exactly. A resume state
that is corrupt, or was written under other settings (its fingerprint differs), is set aside with a warning and
the stage restarts from its beginning, which gives the same result, only later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Optional

import jax

log = logging.getLogger(__name__)


class Stopped(Exception):
    """Raised by a stage that stopped on request; `where` names the stage and its position, `state` and `loop`
    carry what a caller needs to save (the train state and the loop's position/history), when it has any."""

    def __init__(self, where: str, state: Any = None, loop: Optional[dict] = None):
        super().__init__(where)
        self.where, self.state, self.loop = where, state, loop


def fingerprint(*parts: Any) -> str:
    """Returns a sha256 of `parts` (dataclasses, dicts, numbers, strings): a resume state records the settings it
    was made under and is only used under the same ones."""
    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {"__type__": type(x).__name__, **{f.name: plain(getattr(x, f.name))
                                                     for f in dataclasses.fields(x)}}
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x if isinstance(x, (int, float, str, bool, type(None))) else repr(x)
    return hashlib.sha256(json.dumps(plain(list(parts)), sort_keys=True).encode()).hexdigest()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def clear(root: str) -> None:
    """Removes the resume state under `root` (process 0; every process returns after it is gone)."""
    if jax.process_index() == 0 and os.path.isdir(root):
        shutil.rmtree(root)
    _barrier(f"rporec_jax: cleared {root}")


def save(root: str, step: int, arrays: Any, meta: dict) -> None:
    """Saves the resume state `arrays` (a pytree of arrays) and `meta` (JSON) as step `step` under `root`, keeping
    only it, and seals it with a sha256 manifest once written. Collective: every process calls it."""
    import orbax.checkpoint as ocp

    from rporec_jax.train.ckpt_integrity import newest_intact, seal, steps

    root = os.path.abspath(root)
    if step in steps(root):
        try:
            if newest_intact(root, [step]) == step:  # stopped again before any step: the state is the same
                return
        except Exception:  # noqa: BLE001 -- a damaged copy of this step is replaced below
            pass
        clear(root)
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=1)) as m:
        m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
        m.wait_until_finished()
    if jax.process_index() == 0:
        seal(root)
    _barrier(f"rporec_jax: saved {root}")


def load(root: str, like: Callable[[dict], Any], fp: str, what: str) -> Optional[tuple[Any, dict]]:
    """Returns (arrays, meta) of the resume state under `root`, or None when there is none, or when it is corrupt
    or its `meta['fingerprint']` differs from `fp` (both warned about, naming `what`, and the state removed: the
    stage restarts from its beginning). `like(meta)` gives the arrays' pytree of `jax.ShapeDtypeStruct`s with
    the shardings to restore onto."""
    import orbax.checkpoint as ocp

    from rporec_jax.train.ckpt_integrity import CheckpointCorrupt, newest_intact

    root = os.path.abspath(root)
    got, why = None, None
    try:
        step = newest_intact(root)
    except CheckpointCorrupt as e:
        step, why = None, f"the saved resume state is unusable ({e})"
    if step is not None:
        with ocp.CheckpointManager(root) as m:
            meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if meta.get("fingerprint") == fp:
                got = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like(meta))))["state"], \
                    meta
            else:
                why = "the saved resume state was made with other settings"
    _barrier(f"rporec_jax: read {root}")  # every process has looked before one removes it
    if why is not None:
        log.warning("%s: %s; the stage restarts from its beginning", what, why)
        clear(root)
    return got


def abstract(tree: Any) -> Any:
    """Returns `tree` as `jax.ShapeDtypeStruct`s with the arrays' shardings (an orbax restore target)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
