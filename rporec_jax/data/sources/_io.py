"""File reading shared by sources: per-line decoding with located errors, and checked downloads."""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Iterator

from rporec_jax.data.rows import RowReport


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


def md5sum(path: str | os.PathLike) -> str:
    """Returns the hex MD5 of a file's bytes."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None = None) -> Path:
    """Returns `dest` after downloading `url` into it (via a temp file, so a broken download never looks complete).

    Raises FileNotFoundError naming the URL when there is no network, and ValueError on a checksum mismatch.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"{dest} is absent and downloading it from {url} failed: {e}") from e
    if md5 is not None and (got := md5sum(tmp)) != md5:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{url}: MD5 {got} does not match the published {md5}")
    os.replace(tmp, dest)
    return dest
