"""Checksums for orbax checkpoint steps: a sha256 manifest of every file of a finished step, written atomically
after orbax has finished it, and a restore-time check that picks the newest step whose files all match."""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

MANIFEST = "integrity.sha256.json"  # inside the step directory, so orbax's garbage collection removes it too
log = logging.getLogger(__name__)


class CheckpointCorrupt(Exception):
    """Raised when checkpoints exist but none of the candidates is intact."""


def steps(root) -> list[int]:
    """Returns the finished step numbers under the orbax root `root`, ascending (orbax's tmp dirs excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _files(step_dir: Path) -> list[str]:
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(MANIFEST + "."))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def seal(root, below: Optional[int] = None) -> list[int]:
    """Returns the steps under `root` (those < `below` if given) that had no manifest and now have one."""
    done = []
    for step in steps(root):
        d = Path(root) / str(step)
        if (below is not None and step >= below) or (d / MANIFEST).exists():
            continue
        entries = {rel: {"bytes": (d / rel).stat().st_size, "sha256": _sha256(d / rel)} for rel in _files(d)}
        tmp = d / f"{MANIFEST}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step, "files": entries}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / MANIFEST)  # a reader sees either no manifest or a whole one
        done.append(step)
    return done


def problem(root, step: int) -> Optional[str]:
    """Returns why checkpoint `step` under `root` is not intact (the first bad file), or None when it is."""
    d = Path(root) / str(step)
    try:
        manifest = json.loads((d / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"has no checksum manifest {MANIFEST} (its save never finished)"
    except (ValueError, KeyError) as e:
        return f"has an unreadable {MANIFEST} ({e})"
    for rel, want in sorted(manifest.items()):
        p = d / rel
        if not p.is_file():
            return f"lost {rel}"
        if p.stat().st_size != want["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, {want['bytes']} were saved"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its saved sha256"
    extra = sorted(set(_files(d)) - set(manifest))
    if extra:
        return f"holds {extra[0]}, which was not saved with it"
    return None


def newest_intact(root, candidates: Optional[list[int]] = None, quarantine: bool = False) -> Optional[int]:
    """Returns the newest intact step among `candidates` (default: every step under `root`), or None when there
    are none; warns naming each corrupt newer step and, with `quarantine`, moves it to `<root>.corrupt/` so orbax
    neither restores nor overwrites it. Raises CheckpointCorrupt when candidates exist but none is intact."""
    root = Path(root)
    candidates = sorted(steps(root) if candidates is None else candidates, reverse=True)
    bad = []
    for step in candidates:
        why = problem(root, step)
        if why is None:
            for b, w in bad:
                log.warning("checkpoint %s is corrupt (%s); restoring step %d instead", root / str(b), w, step)
            return step
        bad.append((step, why))
        if quarantine:
            aside = root.parent / f"{root.name}.corrupt"
            aside.mkdir(exist_ok=True)
            dest = aside / str(step)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(root / str(step), dest)
    if not bad:
        return None
    raise CheckpointCorrupt("no intact checkpoint in " + str(root) + ": " + "; ".join(
        f"step {s} {w}" for s, w in bad) + (f" (moved to {root.name}.corrupt/)" if quarantine else ""))
