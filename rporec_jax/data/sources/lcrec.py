"""LC-Rec processed JSON (`{name}.inter.json` user -> item ids in time order, `{name}.item.json` id -> text)."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import ClassVar

from rporec_jax.data.interactions import Interactions, build_interactions
from rporec_jax.data.items import clean_text, item_msg
from rporec_jax.data.ranges import Range, check_ranges
from rporec_jax.data.rows import DataError, RowReport


@dataclasses.dataclass(frozen=True)
class LCRecConfig:
    """An LC-Rec style dataset directory; `prefix` is the file prefix (auto-detected when there is one)."""

    root: str = ""
    prefix: str = ""
    max_description_chars: int = 500
    skip_bad_rows: bool = False

    RANGES: ClassVar[dict[str, Range]] = {"max_description_chars": Range(1)}

    def __post_init__(self):
        check_ranges(self)

    @property
    def name(self) -> str:
        """Returns the dataset name used for prompt templates and directory names."""
        return f"lcrec-{self._prefix()}"

    def _prefix(self) -> str:
        if self.prefix:
            return self.prefix
        found = sorted(Path(self.root).glob("*.inter.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{self.root}: expected exactly one *.inter.json (found {len(found)}); set prefix")
        return found[0].name[: -len(".inter.json")]

    def files(self) -> list[Path]:
        """Returns [inter.json, item.json]."""
        p = self._prefix()
        out = [Path(self.root) / f"{p}.inter.json", Path(self.root) / f"{p}.item.json"]
        for f in out:
            if not f.exists():
                raise FileNotFoundError(f"{f} does not exist")
        return out

    def load(self) -> Interactions:
        """Returns the interactions; positions stand in for timestamps (the format has no times)."""
        return load_lcrec(self)


def _read_json(path: Path, report: RowReport, what: str) -> dict:
    """Returns the top-level object of `path`; a key given twice (JSON would keep only the last value) is a bad
    record `what KEY`, skipped entirely under `skip_bad_rows`. An empty object is an error."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, None, f"is not valid utf-8 ({e.reason} at byte {e.start})") from e
    # Hooks run innermost object first, so the last call sees the top-level object's keys.
    dup_calls: list[list[str]] = []

    def pairs(kv: list) -> dict:
        dup_calls.append([k for k, n in collections.Counter(k for k, _ in kv).items() if n > 1])
        return dict(kv)

    try:
        obj = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"is not valid JSON ({e.msg}, column {e.colno})") from e
    if not isinstance(obj, dict):
        raise DataError(path, 1, None, f"expected a JSON object at top level, got {type(obj).__name__}")
    for key in dup_calls[-1]:
        report.bad(path, f"{what} {key}", None, "appears more than once (each key must be unique; JSON would keep "
                                                "only the last)")
        del obj[key]
    if not obj:
        raise DataError(path, None, None, f"has no {what}s{report.skipped_note()}")
    return obj


def load_lcrec(cfg: LCRecConfig) -> Interactions:
    """Returns interactions from the two JSON files; bad records name the file, record key and field."""
    report = RowReport(skip_bad_rows=cfg.skip_bad_rows)
    inter_path, item_path = cfg.files()
    items = _read_json(item_path, report, "item")
    texts: dict[int, str] = {}
    for key, row in items.items():
        where = f"item {key}"
        try:
            iid = int(key)
        except ValueError:
            report.bad(item_path, where, None, "item key is not an integer id")
            continue
        if iid in texts:
            report.bad(item_path, where, None, f"item id {iid} is already given by another key")
            continue
        if not isinstance(row, dict):
            report.bad(item_path, where, None, f"expected an object, got {type(row).__name__}")
            continue
        title = row.get("title")
        if not isinstance(title, str) or not title.strip():
            report.bad(item_path, where, "title", "missing or empty")
            continue
        desc = clean_text(row.get("description", ""))
        if len(desc) > cfg.max_description_chars:
            desc = desc[: cfg.max_description_chars].rsplit(" ", 1)[0] + " ..."
        texts[iid] = item_msg([
            ("title", clean_text(title)),
            ("brand", clean_text(row.get("brand", ""))),
            ("categories", clean_text(row.get("categories", ""))),
            ("description", desc),
        ])
    inter = _read_json(inter_path, report, "user")
    events = []
    for user, seq in inter.items():
        where = f"user {user}"
        if not isinstance(seq, list) or not seq:
            report.bad(inter_path, where, None, "expected a non-empty list of item ids")
            continue
        bad = next((x for x in seq if not isinstance(x, int) or isinstance(x, bool)), None)
        if bad is not None:
            report.bad(inter_path, where, None, f"item id {bad!r} is not an integer")
            continue
        unknown = next((x for x in seq if x not in texts), None)
        if unknown is not None:
            report.bad(inter_path, where, None, f"item id {unknown} is not in {item_path.name}")
            continue
        events.extend((user, item, pos) for pos, item in enumerate(seq))
    if not events:
        raise DataError(inter_path, None, None, f"has no valid users{report.skipped_note()}")
    return build_interactions(cfg.name, events, texts, report, has_time=False)
