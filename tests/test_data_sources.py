"""Sources: real dataset statistics, the Amazon 2023 fixture's hand-computed counts, synthetic data, bad rows."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from rporec_jax.data import (Amazon2023Config, DataError, LCRecConfig, MovieLensConfig, SplitConfig, SyntheticConfig,
                             make_instances, next_item_probs)
from rporec_jax.data.sources.synthetic import item_category

FIXTURES = Path(__file__).parent / "fixtures" / "data"
DAY = 86_400_000
T0 = 1_664_582_400_000


def _real(name: str) -> Path:
    root = os.environ.get("RPOREC_DATA_DIR")
    if not root or not (Path(root) / name).is_dir():
        pytest.skip(f"real dataset {name} not found: set RPOREC_DATA_DIR to the directory holding {name}/")
    return Path(root) / name


def test_movielens_100k_statistics():
    data = MovieLensConfig(root=str(_real("ml-100k")), download=False).load()
    assert (data.num_users, data.num_items, data.num_interactions) == (943, 1682, 100_000)
    assert data.report.bad_rows == 0 and data.report.filters == {"items_without_interactions": 0}
    assert data.item_texts[1] == "'title': Toy Story\n 'year': 1995\n 'genres': ['Animation', \"Children's\", 'Comedy']"
    for seq, ts in zip(data.sequences, data.timestamps):
        assert np.all(np.diff(ts) >= 0)
    inst = make_instances(data, SplitConfig())
    counts = [len(inst.select(s)) for s in ("train", "valid", "test")]
    assert counts == [79_245, 9_906, 9_906] and sum(counts) == 100_000 - 943


def test_amazon18_scientific_statistics():
    data = LCRecConfig(root=str(_real("amazon18-scientific"))).load()
    assert (data.num_users, data.num_items, data.num_interactions) == (8_317, 4_344, 58_492)
    assert data.timestamps is None
    # LC-Rec ids are 0-based; our dense ids are the same items shifted by one.
    assert data.item_keys[1:4] == ["0", "1", "2"]
    assert data.item_texts[1].startswith("'title': SUPCO SPP6 Relay/Capacitor")
    inst = make_instances(data, SplitConfig(kind="leave_one_out"))
    counts = [len(inst.select(s)) for s in ("train", "valid", "test")]
    assert counts == [58_492 - 3 * 8_317, 8_317, 8_317]
    with pytest.raises(ValueError, match="temporal split needs timestamps"):
        make_instances(data, SplitConfig(kind="temporal"))


def test_amazon2023_fixture_counts():
    cfg = Amazon2023Config(category="Toy", root=str(FIXTURES / "amazon2023"), min_items=4, download=False)
    data = cfg.load()
    assert (data.num_users, data.num_items, data.num_interactions) == (4, 4, 9)
    assert data.item_keys == ["", "A1", "A2", "A3", "A9"]
    assert data.extra["window_start"] == "2022-07-01"
    assert data.report.filters == {
        "meta_no_title": 1, "meta_span_in_title": 1, "meta_long_title": 1, "meta_bad_price": 1,
        "meta_duplicate_asin": 0, "reviews_of_filtered_items": 4, "reviews_outside_window": 2,
        "items_without_interactions": 1,
    }
    seqs = {u: [data.item_keys[i] for i in s] for u, s in zip(data.user_keys, data.sequences)}
    assert seqs == {"u1": ["A1", "A2", "A3"], "u2": ["A9", "A2", "A3"], "u3": ["A1", "A3"], "u4": ["A2"]}
    assert data.item_texts[1] == ("'title': Blue Guitar Strings & Picks\n 'average_rating': 4.5\n"
                                  " 'rating_number': 10\n 'description': ['Great strings']")
    assert data.item_texts[3].startswith("'title': Caf Piano Bench\n")
    inst = make_instances(data, SplitConfig())
    assert len(inst) == 5
    assert [len(inst.select(s)) for s in ("train", "valid", "test")] == [4, 0, 1]
    (test,) = inst.select("test")
    assert data.user_keys[inst.user[test]] == "u3" and inst.timestamp[test] == T0 + 9 * DAY


def test_amazon2023_window_not_widened_when_enough_items():
    cfg = Amazon2023Config(category="Toy", root=str(FIXTURES / "amazon2023"), min_items=3, download=False)
    data = cfg.load()
    assert data.extra["window_start"] == "2022-10-01" and data.num_items == 3
    assert data.report.filters["reviews_outside_window"] == 3


def test_amazon2023_missing_files_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download disabled"):
        Amazon2023Config(category="Toy", root=str(tmp_path), download=False).files()


def test_synthetic_is_seeded_and_follows_its_oracle():
    cfg = SyntheticConfig(num_users=300, seed=3)
    a, b = cfg.load(), cfg.load()
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    assert a.item_texts == b.item_texts
    c = SyntheticConfig(num_users=300, seed=4).load()
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a.sequences, c.sequences))
    p = next_item_probs(cfg, 2)
    assert p[0] == 0 and abs(p.sum() - 1) < 1e-9
    # Empirical frequency of "next item stays in the hidden category" matches stay*(1-noise) + noise/C.
    stays = total = 0
    for seq, st in zip(a.sequences, a.extra["state"]):
        stays += int(np.sum(item_category(cfg, seq[1:]) == st[:-1]))
        total += len(seq) - 1
    expected = cfg.stay * (1 - cfg.noise) + cfg.noise / cfg.num_categories
    assert abs(stays / total - expected) < 0.03
    # The state's own category carries exactly the oracle's mass for it.
    m = cfg.items_per_category
    assert abs(p[1 + 2 * m : 1 + 3 * m].sum() - expected) < 1e-9


# ---- bad rows: errors name file, line and field; skip_bad_rows counts instead ----

def _ml(tmp_path, u_data: bytes, u_item: bytes | None = None) -> MovieLensConfig:
    item = "|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0"
    default = f"1|Alpha (1990)|01-Jan-1990||url{item}\n2|Beta (1991)|01-Jan-1991||url{item}\n".encode()
    (tmp_path / "u.item").write_bytes(u_item if u_item is not None else default)
    (tmp_path / "u.data").write_bytes(u_data)
    return MovieLensConfig(root=str(tmp_path), download=False)


@pytest.mark.parametrize("line,field,pattern", [
    (b"1\t2\tx\t100", "rating", "expected a number, got 'x'"),
    (b"1\t2\t3\tyesterday", "timestamp", "expected a number"),
    (b"1\t9\t3\t100", "item_id", "item 9 is not in u.item"),
    (b"1\t2\t3", None, "has 3 fields, expected 4"),
])
def test_movielens_bad_rows(tmp_path, line, field, pattern):
    cfg = _ml(tmp_path, b"1\t1\t5\t10\n2\t2\t4\t20\n" + line + b"\n")
    with pytest.raises(DataError, match=pattern) as e:
        cfg.load()
    assert e.value.path.endswith("u.data") and e.value.line == 3 and e.value.field == field
    assert "u.data:3:" in str(e.value)
    skipped = MovieLensConfig(root=cfg.root, download=False, skip_bad_rows=True).load()
    assert skipped.report.bad_rows == 1 and skipped.num_interactions == 2
    assert "u.data:3" in skipped.report.bad_row_examples[0]


def test_movielens_bad_item_row(tmp_path):
    cfg = _ml(tmp_path, b"1\t1\t5\t10\n", u_item=b"1|Alpha (1990)|x||url|0|1\n")
    with pytest.raises(DataError, match=r"u.item:1: has 7 fields, expected 24"):
        cfg.load()


def _amazon(tmp_path, reviews: bytes, meta: list[bytes] | None = None) -> Amazon2023Config:
    meta = meta if meta is not None else [json.dumps({"parent_asin": "A", "title": "T", "price": 1}).encode()]
    with gzip.open(tmp_path / "meta_C.jsonl.gz", "wb") as f:
        f.write(b"\n".join(meta) + b"\n")
    with gzip.open(tmp_path / "C.csv.gz", "wb") as f:
        f.write(b"user_id,parent_asin,rating,timestamp\n" + reviews)
    return Amazon2023Config(category="C", root=str(tmp_path), download=False, min_items=1)


def test_amazon2023_bad_rows(tmp_path):
    ok = f"u,A,5.0,{T0}\n".encode()
    with pytest.raises(DataError, match=r"C.csv.gz:3: field 'timestamp' expected an integer"):
        _amazon(tmp_path, ok + b"u,A,5.0,soon\n").load()
    with pytest.raises(DataError, match=r"C.csv.gz:2: field 'rating' expected a number, got 'great'"):
        _amazon(tmp_path, b"u,A,great,1\n").load()
    with pytest.raises(DataError, match=r"C.csv.gz:3: is not valid utf-8"):
        _amazon(tmp_path, ok + b"u\xff,A,5.0,1\n").load()
    with pytest.raises(DataError, match=r"meta_C.jsonl.gz:2: is not valid JSON"):
        _amazon(tmp_path, ok, meta=[b'{"parent_asin": "A", "title": "T", "price": 1}', b"{oops"]).load()
    with pytest.raises(DataError, match=r"meta_C.jsonl.gz:1: field 'parent_asin' missing"):
        _amazon(tmp_path, ok, meta=[b'{"title": "T", "price": 1}']).load()
    cfg = _amazon(tmp_path, ok + b"u,A,great,1\n" + f"u,A,4.0,{T0 + 1}\n".encode())
    data = Amazon2023Config(**{**cfg.__dict__, "skip_bad_rows": True}).load()
    assert data.report.bad_rows == 1 and data.num_interactions == 2


def test_lcrec_bad_records(tmp_path):
    def write(inter, items):
        (tmp_path / "X.inter.json").write_text(inter)
        (tmp_path / "X.item.json").write_text(items)
        return LCRecConfig(root=str(tmp_path))

    items = json.dumps({"0": {"title": "a"}, "1": {"title": "b"}})
    with pytest.raises(DataError, match=r"X.inter.json:user 1: item id 7 is not in X.item.json"):
        write(json.dumps({"0": [0, 1], "1": [0, 7]}), items).load()
    with pytest.raises(DataError, match=r"X.inter.json:user 0: expected a non-empty list"):
        write(json.dumps({"0": []}), items).load()
    with pytest.raises(DataError, match=r"X.item.json:item 1: field 'title' missing or empty"):
        write(json.dumps({"0": [0, 1]}), json.dumps({"0": {"title": "a"}, "1": {"brand": "b"}})).load()
    with pytest.raises(DataError, match=r"X.inter.json:2: is not valid JSON"):
        write('{"0": [0, 1],\n "1": [0,, 1]}', items).load()
    data = LCRecConfig(root=str(tmp_path), skip_bad_rows=True)
    write(json.dumps({"0": [0, 1], "1": [0, 7], "2": [1, 0, 1]}), items)
    d = data.load()
    assert d.report.bad_rows == 1 and d.num_users == 2 and d.num_interactions == 5


def test_movielens_1m_format(tmp_path):
    (tmp_path / "movies.dat").write_bytes("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                          "2::Caf\xe9 (2001)::Drama\n".encode("latin-1"))
    (tmp_path / "ratings.dat").write_bytes(b"7::2::5::978300760\n7::1::3::978300700\n8::1::4::978300800\n")
    data = MovieLensConfig(root=str(tmp_path), variant="1m", download=False).load()
    assert (data.num_users, data.num_items, data.num_interactions) == (2, 2, 3)
    assert data.sequences[0].tolist() == [1, 2]  # sorted by timestamp, not file order
    assert data.item_texts[2] == "'title': Caf\xe9\n 'year': 2001\n 'genres': ['Drama']"
