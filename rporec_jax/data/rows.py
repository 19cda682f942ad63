"""Row-level input validation: errors that name file/line/field, and a report of skipped and filtered rows."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


class DataError(ValueError):
    """A malformed input row; the message names the file, the line (or record) and the field."""

    def __init__(self, path: str | os.PathLike, line: int | str | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = str(path) + (f":{line}" if line is not None else "")
        what = f" field {field!r}" if field is not None else ""
        super().__init__(f"{where}:{what} {message}")


@dataclasses.dataclass
class RowReport:
    """Counts of bad rows skipped, of rows removed by each filter, and of duplicate interaction rows (rows
    repeating an earlier (user, item, time); dropped or kept as the source's `duplicates` says), so nothing is
    dropped or doubled silently."""

    skip_bad_rows: bool = False
    bad_rows: int = 0
    bad_row_examples: list[str] = dataclasses.field(default_factory=list)
    filters: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicate_rows: int = 0

    def bad(self, path: str | os.PathLike, line: int | str | None, field: str | None, message: str) -> None:
        """Returns None after counting a bad row, or raises `DataError` when bad rows are not skipped."""
        err = DataError(path, line, field, message)
        if not self.skip_bad_rows:
            raise err
        self.bad_rows += 1
        # A handful of examples is enough to diagnose; keeping all would bloat the manifest.
        if len(self.bad_row_examples) < 20:
            self.bad_row_examples.append(str(err))

    def removed(self, filter_name: str, count: int) -> None:
        """Returns None after adding `count` rows to the tally of `filter_name` (zero counts are kept too)."""
        self.filters[filter_name] = self.filters.get(filter_name, 0) + int(count)

    def skipped_note(self) -> str:
        """Returns " (N bad rows skipped)" when rows were skipped, else '' (for messages about what is left)."""
        return f" ({self.bad_rows} bad rows skipped)" if self.bad_rows else ""

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-serialisable dict."""
        return dataclasses.asdict(self)
