"""File reading shared by sources: per-line decoding with located errors, checked downloads, temp dirs that a
later run can tell abandoned."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

from rporec_jax.data.rows import RowReport

DOWNLOAD_RECORD = ".download.json"


def open_bytes(path: str | os.PathLike):
    """Returns a binary file object for `path`, transparently gunzipping `.gz` files."""
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def iter_lines(path: str | os.PathLike, report: RowReport, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Returns an iterator of (1-based line number, decoded line without newline); undecodable lines are bad rows."""
    with open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                report.bad(path, lineno, None, f"is not valid {encoding} ({e.reason} at byte {e.start})")
                continue
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Returns the hex digest (`hashlib` algorithm name) of a file's bytes."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_path(dest: Path) -> Path:
    """Returns the sidecar `<dest>.download.json` that records where `dest` came from, its size and sha256."""
    return dest.with_name(dest.name + DOWNLOAD_RECORD)


def download_record(path: Path) -> dict | None:
    """Returns {url, bytes, sha256} recorded when `path` was downloaded, None for a file put there by hand."""
    rec = record_path(path)
    return json.loads(rec.read_text()) if rec.exists() else None


def verify_download(path: Path, size: int, sha256: str) -> dict | None:
    """Returns the download record of `path` (None if it has none) after checking that the file still has the
    recorded size and sha256 (given: the caller hashed it); raises ValueError on a truncated or replaced file."""
    rec = download_record(path)
    if rec is not None and (size != rec["bytes"] or sha256 != rec["sha256"]):
        got = f"{size} bytes" if size != rec["bytes"] else f"sha256 {sha256}"
        raise ValueError(f"{path}: {got}, but it came from {rec['url']} as {rec['bytes']} bytes with sha256 "
                         f"{rec['sha256']}; delete it and {record_path(path).name} to download it again")
    return rec


def missing_note(root: Path, dataset_dir: str, names: tuple[str, ...]) -> str:
    """Returns "<root> has no <names>; " for a download announcement, adding that $RPOREC_DATA_DIR/<dataset_dir>
    lacks them too when that variable is set (the user expected a local copy there) and points elsewhere."""
    want = "/".join(names)
    note = f"{root} has no {want}"
    if env := os.environ.get("RPOREC_DATA_DIR"):
        local = Path(env) / dataset_dir
        if local.resolve() != root.resolve() and not all((local / n).exists() for n in names):
            note += f", and $RPOREC_DATA_DIR is set but {local} has no {want} either"
    return note + "; "


def download(url: str, dest: Path, md5: str | None = None, why: str = "") -> Path:
    """Returns `dest` after downloading `url` into it via a temp file (a broken download never looks complete),
    announcing it on stderr first (`why` says why, e.g. which local copy was missing), and records its size and
    sha256 next to it (`record_path`) so that later runs verify it.

    Raises FileNotFoundError naming the URL when there is no network, ValueError on a short read or a checksum
    mismatch.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(dest)
    print(f"{why}downloading {url} to {dest}", file=sys.stderr, flush=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:  # whatever stops it (no network, a cut connection, a bad checksum, Ctrl-C), the temp file goes
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                expected = r.headers.get("Content-Length")
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            raise FileNotFoundError(f"{dest} is absent and downloading it from {url} failed: {e}") from e
        except http.client.HTTPException as e:  # e.g. IncompleteRead: the connection closed early
            raise ValueError(f"{url}: the download broke off ({type(e).__name__}: {e}); run again to retry") from e
        size = tmp.stat().st_size
        if expected is not None and size != int(expected):
            raise ValueError(f"{url}: received {size} bytes of the announced {expected}; run again to retry")
        if md5 is not None and (got := file_digest(tmp, "md5")) != md5:
            raise ValueError(f"{url}: MD5 {got} does not match the published {md5}")
        put_recorded(tmp, dest, url)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


PART_STALE_AFTER_S = 600  # a live download writes at least every 60 s (its read timeout)


def remove_stale_parts(dest: Path) -> list[Path]:
    """Returns the temp files `<dest>.part<pid>` and `<dest>.download.json.part<pid>` that a killed download left
    (not written for PART_STALE_AFTER_S), after removing them."""
    removed = []
    for pattern in (dest.name + ".part*", record_path(dest).name + ".part*"):
        for p in dest.parent.glob(pattern):
            try:
                stale = p.name.rsplit(".part", 1)[1].isdigit() and time.time() - p.stat().st_mtime > PART_STALE_AFTER_S
                if stale:
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass  # removed meanwhile
    return removed


def put_recorded(src: Path, dest: Path, url: str) -> None:
    """Moves the complete file `src` to `dest` (atomically, same file system), recording `url`, size and sha256."""
    rec = record_path(dest)
    part = rec.with_name(rec.name + f".part{os.getpid()}")
    try:
        part.write_text(json.dumps({"url": url, "bytes": src.stat().st_size, "sha256": file_digest(src)}))
        # The record first: a file without its record would be trusted unverified.
        os.replace(part, rec)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(src, dest)


# ------------------------------------------------------------------------- temp dirs of killed processes

STALE_AFTER_S = 24 * 3600  # a temp dir whose owner cannot be checked (another host, or none recorded)
OWNER = ".owner.json"


def owned_tmp_dir(parent: Path, prefix: str) -> Path:
    """Returns a new directory `parent/<prefix>-<random>` holding an owner record (host, pid), so that
    `remove_stale_tmp_dirs` can tell one left by a killed process from one a live process is filling."""
    d = parent / f"{prefix}-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    (d / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    return d


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def stale_reason(d: Path, now: float | None = None) -> str | None:
    """Returns why temp dir `d` is stale (its owner process is dead, or it is older than STALE_AFTER_S and its
    owner cannot be checked), or None when it may belong to a live process."""
    now = time.time() if now is None else now
    try:
        owner = json.loads((d / OWNER).read_text())
    except (OSError, ValueError):
        owner = None
    if owner is not None and owner.get("host") == socket.gethostname():
        return None if _pid_alive(int(owner["pid"])) else f"its process {owner['pid']} is gone"
    try:
        age = now - (owner["started"] if owner else d.stat().st_mtime)
    except OSError:
        return None  # removed meanwhile
    return f"it is {age / 3600:.0f} h old" if age > STALE_AFTER_S else None


def remove_stale_tmp_dirs(parent: Path, pattern: str, log=None) -> list[Path]:
    """Returns the directories matching `parent/pattern` that `stale_reason` calls stale, after removing them."""
    removed = []
    for d in sorted(parent.glob(pattern)) if parent.is_dir() else []:
        if d.is_dir() and (why := stale_reason(d)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
            if log:
                log(f"removed {d}, left by an interrupted run ({why})")
    return removed
