"""Valid ranges of numeric config fields, checked with a message that names the field, its value and the range."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or open interval of numbers (None = unbounded); `note` explains special values, e.g. '0 = off'.
    A tuple field is checked element by element; None (an unset optional field) is always accepted."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            s = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            s = f"{'>' if self.lo_open else '>='} {self.lo}"
        elif self.hi is not None:
            s = f"{'<' if self.hi_open else '<='} {self.hi}"
        else:
            s = "a finite number"
        return s + (f" ({self.note})" if self.note else "")

    def contains(self, x: Any) -> bool:
        """Returns whether the number `x` is finite and inside the range."""
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def violation(self, key: str, v: Any) -> str | None:
        """Returns "KEY=v: must be RANGE" when `v` (or an element of a tuple `v`) is outside the range, else None."""
        many = isinstance(v, (tuple, list))
        if any(x is not None and not self.contains(x) for x in (v if many else (v,))):
            return f"{key}={v!r}: {'each value ' if many else ''}must be {self}"
        return None


def range_error(obj: Any, ranges: Mapping[str, Range], prefix: str) -> str | None:
    """Returns the first `Range.violation` among the fields of `obj` (keys named PREFIXfield), else None."""
    return next((m for name, rng in ranges.items() if (m := rng.violation(prefix + name, getattr(obj, name)))), None)


def check_ranges(obj: Any) -> None:
    """Raises ValueError naming `Class.field`, its value and range when a field of `obj` is outside
    `type(obj).RANGES` (for `__post_init__` of the data configs, which are also built without a RunConfig)."""
    if msg := range_error(obj, type(obj).RANGES, f"{type(obj).__name__}."):
        raise ValueError(msg)
