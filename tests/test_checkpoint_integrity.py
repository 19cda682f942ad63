"""Checkpoint checksums: a corrupt or incomplete newest step is never restored silently; the newest intact one is
restored with a warning naming the bad one, and none intact is one clear error."""

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rporec_jax.train import ckpt_integrity as ci

TREE = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64), "b": {"c": jnp.ones((8,), jnp.int32)}}


def _save(root: Path, steps=(2, 4)):
    """Saves TREE * step at each step (async, like stage 2) and seals them as stage 2 does."""
    m = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                                                         enable_async_checkpointing=True))
    for s in steps:
        m.save(s, args=ocp.args.StandardSave(jax.tree_util.tree_map(lambda x: x * s, TREE)))
        ci.seal(root, below=s)
    m.wait_until_finished()
    m.close()
    ci.seal(root)


def _restore(root: Path, step: int) -> dict:
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), TREE)
    with ocp.CheckpointManager(root) as m:
        return m.restore(step, args=ocp.args.StandardRestore(like))


def _data_file(root: Path, step: int) -> Path:
    """Returns the largest file of the step (the array data)."""
    return max((p for p in (root / str(step)).rglob("*") if p.is_file() and p.name != ci.MANIFEST),
               key=lambda p: p.stat().st_size)


def _flip8(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 8] = bytes(b ^ 0xFF for b in raw[mid:mid + 8])  # always differs, unlike zeroing zeros
    path.write_bytes(bytes(raw))


def _same(got, step):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b) * step), got, TREE)


@pytest.mark.parametrize("damage", ["intact", "flip8", "delete", "truncate"])
def test_restore_takes_the_newest_intact_step_and_names_the_bad_one(tmp_path, caplog, damage):
    root = tmp_path / "stage2"
    _save(root)
    if damage == "flip8":
        _flip8(_data_file(root, 4))
    elif damage == "delete":
        _data_file(root, 4).unlink()
    elif damage == "truncate":
        f = _data_file(root, 4)
        f.write_bytes(f.read_bytes()[:-8])
    with caplog.at_level(logging.WARNING, logger=ci.__name__):
        step = ci.newest_intact(root, quarantine=True)
    if damage == "intact":
        assert step == 4 and not caplog.records
        assert not (tmp_path / "stage2.corrupt").exists()
    else:
        assert step == 2
        assert [r.getMessage() for r in caplog.records if f"{root / '4'} is corrupt" in r.getMessage()]
        assert ci.steps(root) == [2] and (tmp_path / "stage2.corrupt" / "4").is_dir()  # orbax no longer sees it
    _same(_restore(root, step), step)


def test_no_intact_step_is_one_clear_error(tmp_path):
    root = tmp_path / "stage2"
    _save(root)
    _flip8(_data_file(root, 4))
    (root / "2" / ci.MANIFEST).unlink()  # as if the process died after orbax finished but before the checksums
    with pytest.raises(ci.CheckpointCorrupt) as e:
        ci.newest_intact(root)
    msg = str(e.value)
    assert "\n" not in msg and "step 4" in msg and "does not match" in msg and "step 2 has no checksum" in msg
    assert ci.steps(root) == [2, 4]  # without quarantine (read-only export/recommend) nothing moves
    assert ci.newest_intact(tmp_path / "empty") is None


def test_a_mid_stage_resume_state_round_trips_and_a_bad_one_is_set_aside(tmp_path, caplog):
    from rporec_jax.train import resume

    root = tmp_path / "stage1_resume"
    like = lambda meta: resume.abstract(TREE)  # noqa: E731
    meta = {"fingerprint": "a", "loop": {"epoch": 1, "losses": [0.5]}}
    resume.save(str(root), 3, TREE, meta)
    assert ci.problem(root, 3) is None  # sealed with its manifest
    got, got_meta = resume.load(str(root), like, "a", "stage 1")
    _same(got, 1)
    assert got_meta == meta
    with caplog.at_level(logging.WARNING):  # made under other settings: set aside, the stage restarts
        assert resume.load(str(root), like, "b", "stage 1") is None
    assert "stage 1: the saved resume state was made with other settings" in caplog.text and not root.exists()
    resume.save(str(root), 3, TREE, meta)
    _flip8(_data_file(root, 3))
    with caplog.at_level(logging.WARNING):  # corrupt: the same
        assert resume.load(str(root), like, "a", "stage 1") is None
    assert "the saved resume state is unusable" in caplog.text and not root.exists()
