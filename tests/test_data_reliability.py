"""Bad data inputs refused with located messages, duplicates counted, checked downloads, atomic extraction,
and temp dirs of killed prepares cleaned up (issue 17, items 9-13). Offline: downloads read file:// URLs."""

import gzip
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from rporec_jax.data import DataConfig, DataError, LCRecConfig, MovieLensConfig, SplitConfig, prepare_dataset
from rporec_jax.data.__main__ import main as data_main
from rporec_jax.data.sources import amazon2023, movielens
from rporec_jax.data.sources._io import OWNER, owned_tmp_dir

GENRES = "|0" * 18 + "|1"


def _u_item(n: int = 5) -> bytes:
    return "".join(f"{i}|Movie {i} (199{i})|01-Jan-1990||url{GENRES}\n" for i in range(1, n + 1)).encode()


def _u_data(users: int = 2, per_user: int = 6) -> bytes:
    rows = [f"{u}\t{1 + k % 5}\t4\t{1000 * u + k}" for u in range(1, users + 1) for k in range(per_user)]
    return ("\n".join(rows) + "\n").encode()


def _ml(root: Path, u_data: bytes | None = None, u_item: bytes | None = None, **kw) -> MovieLensConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "u.item").write_bytes(_u_item() if u_item is None else u_item)
    (root / "u.data").write_bytes(_u_data() if u_data is None else u_data)
    return MovieLensConfig(root=str(root), download=False, **kw)


def _lcrec(root: Path, inter: str, items: str | None = None) -> LCRecConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "X.inter.json").write_text(inter)
    (root / "X.item.json").write_text(items if items is not None else json.dumps({"0": {"title": "a"},
                                                                                  "1": {"title": "b"}}))
    return LCRecConfig(root=str(root))


def _prepare_cli(capsys, *args) -> tuple[int, str]:
    rc = data_main(["prepare", *args])
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ item 9

def test_empty_inputs_are_refused_naming_the_file(tmp_path, capsys):
    with pytest.raises(DataError, match=r"u\.data: has no rating rows$"):
        _ml(tmp_path / "a", u_data=b"").load()
    with pytest.raises(DataError, match=r"u\.item: has no movie rows$"):
        _ml(tmp_path / "b", u_item=b"").load()
    with pytest.raises(DataError, match=r"u\.data: has no rating rows \(1 bad rows skipped\)"):
        _ml(tmp_path / "c", u_data=b"1\t9\t4\t5\n", skip_bad_rows=True).load()
    with pytest.raises(DataError, match=r"X\.inter\.json: has no users$"):
        _lcrec(tmp_path / "d", "{}").load()
    with pytest.raises(DataError, match=r"X\.item\.json: has no items$"):
        _lcrec(tmp_path / "e", json.dumps({"0": [0, 1]}), "{}").load()
    # Users with one interaction each give no instance at all: refused at prepare, naming the input files.
    one_each = _ml(tmp_path / "f", u_data=b"1\t1\t4\t5\n2\t2\t4\t6\n")
    with pytest.raises(ValueError, match=r"f/u\.data, .*f/u\.item: 2 users with 2 interactions give "
                                         r"\{'train': 0, 'valid': 0, 'test': 0\} instances"):
        prepare_dataset(DataConfig(source=one_each), tmp_path / "out")
    # The command line prints one located line, exits 1 and leaves no dataset directory behind.
    (tmp_path / "a" / "u.data").write_bytes(b"")
    rc, err = _prepare_cli(capsys, "--source", "movielens", "--root", str(tmp_path / "a"), "--out",
                           str(tmp_path / "out"))
    assert rc == 1 and err.strip() == f"error: {tmp_path / 'a' / 'u.data'}: has no rating rows"
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------------------- item 10

def test_duplicate_ids_refused_and_duplicate_rows_counted(tmp_path, capsys):
    twice = _u_item(3) + b"2|Other (2001)|01-Jan-2001||url" + GENRES.encode() + b"\n"
    with pytest.raises(DataError, match=r"u\.item:4: field 'movie_id' movie id 2 is already on line 2"):
        _ml(tmp_path / "a", u_item=twice).load()
    items = json.dumps({"0": {"title": "a"}, "1": {"title": "b"}})
    with pytest.raises(DataError, match=r"X\.inter\.json:user 7: appears more than once"):
        _lcrec(tmp_path / "b", '{"7": [0, 1], "8": [1, 0], "7": [1]}', items).load()
    with pytest.raises(DataError, match=r"X\.item\.json:item 01: item id 1 is already given by another key"):
        _lcrec(tmp_path / "c", '{"7": [0, 1]}', '{"0": {"title": "a"}, "1": {"title": "b"}, "01": {"title": "c"}}'
               ).load()
    # Exact repeats of a rating row: counted, dropped by default, kept on request, shown by `stats`.
    rows = _u_data()
    dup = rows + rows.splitlines(keepends=True)[3] + rows.splitlines(keepends=True)[7]
    dropped = _ml(tmp_path / "d", u_data=dup).load()
    assert dropped.report.duplicate_rows == 2 and dropped.num_interactions == 12
    kept = _ml(tmp_path / "d", u_data=dup, duplicates="keep").load()
    assert kept.report.duplicate_rows == 2 and kept.num_interactions == 14
    assert data_main(["prepare", "--source", "movielens", "--root", str(tmp_path / "d"), "--out",
                      str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "2 duplicate interaction rows dropped" in err and "duplicate interaction rows 2 (drop" in out
    with pytest.raises(ValueError, match="duplicates='twice'"):
        MovieLensConfig(duplicates="twice")


# ----------------------------------------------------------------------------------------- item 11

def test_stats_on_a_raw_folder_names_the_prepare_command(tmp_path, capsys):
    _ml(tmp_path / "ml")
    assert data_main(["stats", str(tmp_path / "ml")]) == 1
    err = capsys.readouterr().err
    assert "is not a prepared dataset (it has no manifest.json)" in err and "Traceback" not in err
    assert err.strip().endswith(f"python -m rporec_jax.data prepare --source movielens --root {tmp_path / 'ml'}")
    _lcrec(tmp_path / "lc", "{}")
    assert data_main(["stats", str(tmp_path / "lc")]) == 1
    assert "--source lcrec --split leave_one_out --root" in capsys.readouterr().err
    assert data_main(["stats", str(tmp_path / "nowhere")]) == 1
    assert "nowhere does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- item 12

def _zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_downloads_are_announced_recorded_and_verified(tmp_path, monkeypatch, capsys):
    md5 = _zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": _u_data(), "ml-100k/u.item": _u_item()})
    monkeypatch.setitem(movielens.ARCHIVES, "100k", (f"file://{tmp_path / 'ml-100k.zip'}", md5))
    monkeypatch.setenv("RPOREC_DATA_DIR", str(tmp_path / "shared"))
    root = tmp_path / "cache" / "ml-100k"
    cfg = DataConfig(source=MovieLensConfig(root=str(root)))
    ds = prepare_dataset(cfg, tmp_path / "out")
    err = capsys.readouterr().err
    assert (f"$RPOREC_DATA_DIR is set but {tmp_path / 'shared' / 'ml-100k'} has no u.data/u.item either; "
            f"downloading file://{tmp_path / 'ml-100k.zip'} to {root / 'ml-100k.zip'}") in err
    inputs = json.loads((ds / "manifest.json").read_text())["inputs"]
    assert [i["url"] for i in inputs] == [f"file://{tmp_path / 'ml-100k.zip'}#u.data",
                                          f"file://{tmp_path / 'ml-100k.zip'}#u.item"]
    assert inputs[0]["bytes"] == len(_u_data()) and inputs[0]["sha256"] == hashlib.sha256(_u_data()).hexdigest()
    assert prepare_dataset(cfg, tmp_path / "out") == ds  # reuse verifies, and matches
    with open(root / "u.data", "ab") as f:  # a file changed after its download
        f.write(b"1\t1\t4\t99999\n")
    with pytest.raises(ValueError, match=r"u\.data: \d+ bytes, but it came from file://.*#u\.data as \d+ bytes "
                                         r"with sha256 [0-9a-f]{64}; delete it and u\.data\.download\.json"):
        prepare_dataset(cfg, tmp_path / "out")
    # Amazon 2023 (no published checksums): recorded at download, verified on reuse.
    src = tmp_path / "ucsd"
    (src / "benchmark/5core/rating_only").mkdir(parents=True)
    (src / "raw/meta_categories").mkdir(parents=True)
    with gzip.open(src / "benchmark/5core/rating_only/C.csv.gz", "wb") as f:
        rows = [f"u{u},{'AB'[k % 2]},5.0,{1_680_000_000_000 + 1000 * u + k}\n" for u in range(4) for k in range(4)]
        f.write(("user_id,parent_asin,rating,timestamp\n" + "".join(rows)).encode())
    with gzip.open(src / "raw/meta_categories/meta_C.jsonl.gz", "wb") as f:
        f.write(b"".join(json.dumps({"parent_asin": a, "title": a, "price": 1}).encode() + b"\n" for a in "AB"))
    monkeypatch.setattr(amazon2023, "BASE_URL", f"file://{src}")
    acfg = DataConfig(source=amazon2023.Amazon2023Config(category="C", root=str(tmp_path / "amz"), min_items=1))
    inputs = json.loads((prepare_dataset(acfg, tmp_path / "out") / "manifest.json").read_text())["inputs"]
    assert [i["url"] for i in inputs] == [f"file://{src}/benchmark/5core/rating_only/C.csv.gz",
                                          f"file://{src}/raw/meta_categories/meta_C.jsonl.gz"]
    (tmp_path / "amz" / "C.csv.gz").write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"C\.csv\.gz: 9 bytes, but it came from file://"):
        prepare_dataset(acfg, tmp_path / "out")


def test_movielens_extraction_is_atomic(tmp_path, monkeypatch):
    root = tmp_path / "ml"
    root.mkdir()
    # A zip lacking u.item: nothing reaches root, and the temp dir is gone.
    md5 = _zip(root / "ml-100k.zip", {"ml-100k/u.data": _u_data()})
    monkeypatch.setitem(movielens.ARCHIVES, "100k", ("file:///nowhere/ml-100k.zip", md5))
    with pytest.raises(ValueError, match=r"ml-100k\.zip: has no \['u\.item'\]"):
        MovieLensConfig(root=str(root), download=False).files()
    assert sorted(p.name for p in root.iterdir()) == ["ml-100k.zip"]
    # An extraction killed after u.data was renamed in: the next run extracts both again (the local zip, no network).
    md5 = _zip(root / "ml-100k.zip", {"ml-100k/u.data": _u_data(), "ml-100k/u.item": _u_item()})
    monkeypatch.setitem(movielens.ARCHIVES, "100k", ("file:///nowhere/ml-100k.zip", md5))
    (root / "u.data").write_bytes(b"partial")
    MovieLensConfig(root=str(root), download=False).files()
    assert (root / "u.data").read_bytes() == _u_data() and (root / "u.item").read_bytes() == _u_item()
    assert not list(root.glob(".tmp-*"))
    (root / "ml-100k.zip").write_bytes(b"not the published zip")
    (root / "u.item").unlink()
    with pytest.raises(ValueError, match=r"ml-100k\.zip: MD5 [0-9a-f]{32} does not match the published"):
        MovieLensConfig(root=str(root), download=False).files()


def test_a_broken_download_leaves_no_temp_file_and_old_ones_are_removed(tmp_path, monkeypatch):
    import http.client

    from rporec_jax.data.sources import _io

    dest = tmp_path / "d" / "f.bin"
    dest.parent.mkdir()
    old = dest.with_name("f.bin.part999999")  # left by a download killed long ago
    old.write_bytes(b"x")
    os.utime(old, (0, 0))
    fresh = dest.with_name("f.bin.part1")  # written just now: maybe another process's live download
    fresh.write_bytes(b"x")

    class Response:  # the connection breaks off (or Ctrl-C comes) after the first chunk
        headers = {"Content-Length": "100"}

        def __init__(self, error):
            self.error, self.chunks = error, iter([b"a" * 10])

        def read(self, _size):
            chunk = next(self.chunks, None)
            if chunk is None:
                raise self.error
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    for error, expected in ((http.client.IncompleteRead(b"", 90), ValueError),
                            (KeyboardInterrupt(), KeyboardInterrupt)):
        monkeypatch.setattr(_io.urllib.request, "urlopen", lambda url, timeout, e=error: Response(e))
        with pytest.raises(expected):
            _io.download("http://example.invalid/f.bin", dest)
        assert sorted(p.name for p in dest.parent.iterdir()) == ["f.bin.part1"]


# ----------------------------------------------------------------------------------------- item 13

def test_temp_dirs_of_killed_prepares_are_removed_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    # A real prepare killed with SIGKILL while it writes its temp dir.
    proc = subprocess.Popen([sys.executable, "-m", "rporec_jax.data", "prepare", "--source", "synthetic",
                             "--num-users", "20000", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob(".tmp-*/" + OWNER)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = [p.parent for p in out.glob(".tmp-*/" + OWNER)]
    assert len(killed) == 1
    live = owned_tmp_dir(out, ".tmp-live")  # this (live) process's prepare in progress
    fresh = out / ".tmp-old-code-fresh"  # no owner record: kept until it is a day old
    old = out / ".tmp-old-code-old"
    other = out / ".tmp-other-host"
    for d in (fresh, old, other):
        d.mkdir()
    (other / OWNER).write_text(json.dumps({"host": socket.gethostname() + "-x", "pid": 1, "started": time.time()}))
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    logs = []
    prepare_dataset(DataConfig(source=_ml(tmp_path / "ml"), split=SplitConfig(window=3)), out, log=logs.append)
    assert not killed[0].exists() and not old.exists()
    assert live.exists() and fresh.exists() and other.exists()
    assert f"removed {killed[0]}, left by an interrupted run (its process {proc.pid} is gone)" in logs
    assert any(m.startswith(f"removed {old}") and "48 h old" in m for m in logs)
