"""Bad data inputs refused with located messages, duplicates counted, checked downloads, atomic extraction,
and temp dirs of killed prepares cleaned up (issue 17, items 9-13). Offline: downloads read file:// URLs."""

import json
from pathlib import Path

import pytest

from rporec_jax.data import DataConfig, DataError, LCRecConfig, MovieLensConfig, prepare_dataset
from rporec_jax.data.__main__ import main as data_main

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
