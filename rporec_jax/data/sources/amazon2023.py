"""Amazon Reviews 2023 (5-core rating-only CSV + category meta JSONL) with the RPORec reference protocol."""

from __future__ import annotations

import calendar
import csv
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import ClassVar

from rporec_jax.data.interactions import DUPLICATES, Interactions, build_interactions
from rporec_jax.data.items import clean_text, item_msg
from rporec_jax.data.ranges import Range, check_ranges
from rporec_jax.data.rows import DataError, RowReport
from rporec_jax.data.sources._io import download, iter_lines, missing_note

BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023"
REVIEW_COLUMNS = ("user_id", "parent_asin", "rating", "timestamp")


@dataclasses.dataclass(frozen=True)
class Amazon2023Config:
    """One Amazon Reviews 2023 category. Files are read from `root` (flat, or the official sub-folders).

    duplicates: 'drop' (default) or 'keep' review rows that repeat an earlier (user, parent_asin, timestamp);
    counted either way (`RowReport.duplicate_rows`). Meta rows repeating a parent_asin are the reference's
    `meta_duplicate_asin` filter (first kept, counted).
    """

    category: str = "Musical_Instruments"
    root: str = ""
    window_start: str = "2022-10-01"
    window_end: str = "2023-10-01"
    min_items: int = 10_000
    widen_months: int = 3
    max_title_words: int = 50
    download: bool = True
    skip_bad_rows: bool = False
    duplicates: str = "drop"

    RANGES: ClassVar[dict[str, Range]] = {
        "min_items": Range(0, note="0 = never widen the window"), "widen_months": Range(1),
        "max_title_words": Range(1),
    }

    def __post_init__(self):
        check_ranges(self)
        if self.duplicates not in DUPLICATES:
            raise ValueError(f"Amazon2023Config.duplicates={self.duplicates!r}; expected one of {DUPLICATES}")
        for name in ("window_start", "window_end"):
            try:
                dt.date.fromisoformat(getattr(self, name))
            except ValueError:
                raise ValueError(f"Amazon2023Config.{name}={getattr(self, name)!r}: expected a date YYYY-MM-DD") \
                    from None

    @property
    def name(self) -> str:
        """Returns the dataset name used for prompt templates and directory names."""
        return f"amazon2023-{self.category}"

    def files(self) -> list[Path]:
        """Returns [reviews .csv.gz, meta .jsonl.gz], downloading absent ones when `download` is set (their size
        and sha256 are recorded then, and `prepare_dataset` checks them on every later use)."""
        root = Path(self.root)
        want = [
            (f"{self.category}.csv.gz", f"benchmark/5core/rating_only/{self.category}.csv.gz"),
            (f"meta_{self.category}.jsonl.gz", f"raw/meta_categories/meta_{self.category}.jsonl.gz"),
        ]
        out = []
        for flat, official in want:
            found = next((p for p in (root / flat, root / official) if p.exists()), None)
            if found is None:
                if not self.download:
                    raise FileNotFoundError(f"neither {root / flat} nor {root / official} exists (download disabled)")
                found = download(f"{BASE_URL}/{official}", root / flat, why=missing_note(root, "amazon2023", (flat,)))
            out.append(found)
        return out

    def load(self) -> Interactions:
        """Returns the category's interactions after the reference item filters and time window."""
        return load_amazon2023(self)


def _ms(date: dt.date) -> int:
    return calendar.timegm(date.timetuple()) * 1000


def _minus_months(date: dt.date, months: int) -> dt.date:
    m = date.year * 12 + date.month - 1 - months
    return dt.date(m // 12, m % 12 + 1, 1)


def read_meta(path: Path, cfg: Amazon2023Config, report: RowReport) -> dict[str, str]:
    """Returns parent_asin -> item_msg text for the meta rows that pass the reference item filters."""
    texts: dict[str, str] = {}
    removed = {"meta_no_title": 0, "meta_span_in_title": 0, "meta_long_title": 0, "meta_bad_price": 0,
               "meta_duplicate_asin": 0}
    for lineno, line in iter_lines(path, report):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.bad(path, lineno, None, f"is not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            report.bad(path, lineno, None, f"expected a JSON object, got {type(row).__name__}")
            continue
        asin = row.get("parent_asin")
        if not isinstance(asin, str) or not asin:
            report.bad(path, lineno, "parent_asin", "missing or not a non-empty string")
            continue
        title = row.get("title")
        if not isinstance(title, str) or not title.strip():
            removed["meta_no_title"] += 1
            continue
        if "<span id" in title:
            removed["meta_span_in_title"] += 1
            continue
        if len(title.split()) > cfg.max_title_words:
            removed["meta_long_title"] += 1
            continue
        try:
            float(str(row.get("price")))
        except ValueError:
            removed["meta_bad_price"] += 1
            continue
        if asin in texts:
            removed["meta_duplicate_asin"] += 1
            continue
        desc = row.get("description") or []
        if isinstance(desc, str):
            desc = [desc]
        # dict.fromkeys: de-duplicate like the reference's set, but in a stable order.
        desc = [d for d in dict.fromkeys(clean_text(x) for x in desc) if d]
        texts[asin] = item_msg([
            ("title", clean_text(title)),
            ("average_rating", row.get("average_rating")),
            ("rating_number", row.get("rating_number")),
            ("description", desc),
        ])
    for k, v in removed.items():
        report.removed(k, v)
    if not texts:
        raise DataError(path, None, None, f"has no item passing the reference filters {removed}"
                                          f"{report.skipped_note()}")
    return texts


def read_reviews(path: Path, report: RowReport) -> list[tuple[str, str, int]]:
    """Returns (user_id, parent_asin, timestamp_ms) for every well-formed review row, in file order."""
    rows: list[tuple[str, str, int]] = []
    header = None
    for lineno, line in iter_lines(path, report):
        fields = next(csv.reader([line]))
        if header is None:
            header = fields
            missing = [c for c in REVIEW_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}:{lineno}: header lacks column(s) {missing}; expected {list(REVIEW_COLUMNS)}")
            col = {c: header.index(c) for c in REVIEW_COLUMNS}
            continue
        if len(fields) != len(header):
            report.bad(path, lineno, None, f"has {len(fields)} columns, expected {len(header)}")
            continue
        user, asin, rating, ts = (fields[col[c]] for c in REVIEW_COLUMNS)
        if not user or not asin:
            report.bad(path, lineno, "user_id" if not user else "parent_asin", "is empty")
            continue
        try:
            float(rating)
        except ValueError:
            report.bad(path, lineno, "rating", f"expected a number, got {rating!r}")
            continue
        try:
            t = int(ts)
        except ValueError:
            report.bad(path, lineno, "timestamp", f"expected an integer (ms since epoch), got {ts!r}")
            continue
        rows.append((user, asin, t))
    if header is None:
        raise ValueError(f"{path}: empty file; expected a CSV header {list(REVIEW_COLUMNS)}")
    if not rows:
        raise DataError(path, None, None, f"has no review rows{report.skipped_note()}")
    return rows


def load_amazon2023(cfg: Amazon2023Config) -> Interactions:
    """Returns interactions of one category: filtered items, reviews inside the (widened) window."""
    report = RowReport(skip_bad_rows=cfg.skip_bad_rows)
    reviews_path, meta_path = cfg.files()
    texts = read_meta(meta_path, cfg, report)
    reviews = read_reviews(reviews_path, report)
    kept = [r for r in reviews if r[1] in texts]
    report.removed("reviews_of_filtered_items", len(reviews) - len(kept))
    start = dt.date.fromisoformat(cfg.window_start)
    end_ms = _ms(dt.date.fromisoformat(cfg.window_end))
    earliest = min((t for _, _, t in kept), default=0)
    while True:
        start_ms = _ms(start)
        n_items = len({a for _, a, t in kept if start_ms <= t < end_ms})
        # Widen until enough items remain, or until the window already covers the earliest review.
        if n_items >= cfg.min_items or start_ms <= earliest:
            break
        start = _minus_months(start, cfg.widen_months)
    windowed = [r for r in kept if start_ms <= r[2] < end_ms]
    report.removed("reviews_outside_window", len(kept) - len(windowed))
    if not windowed:
        raise DataError(reviews_path, None, None, f"has no review of a kept item inside "
                                                  f"[{start.isoformat()}, {cfg.window_end}) {report.filters}")
    return build_interactions(
        cfg.name, windowed, texts, report, duplicates=cfg.duplicates,
        extra={"window_start": start.isoformat(), "window_end": cfg.window_end},
    )
