"""Item text: cleaning of raw catalogue strings and the `item_msg` rendering used in prompts."""

from __future__ import annotations

import html
import re
from typing import Any, Sequence

_TAG = re.compile(r"<[^>]*>")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_SPACES = re.compile(r"[ \t\r\f\v]+")


def clean_text(text: Any) -> str:
    """Returns `text` HTML-unescaped, with tags stripped, non-ASCII characters replaced by spaces, spaces collapsed."""
    if text is None:
        return ""
    s = html.unescape(str(text))
    s = _TAG.sub(" ", s)
    s = _NON_ASCII.sub(" ", s)
    return _SPACES.sub(" ", s).strip()


def item_msg(fields: Sequence[tuple[str, Any]]) -> str:
    """Returns the reference item text `'k1': v1\\n 'k2': v2 ...` for (key, value) pairs in the given order.

    Lists render as Python-style lists (the reference prints `description` that way); callers pass lists in a
    deterministic order (the reference used a set, whose order changes between runs).
    """
    parts = []
    for key, value in fields:
        if isinstance(value, (list, tuple)):
            value = "[" + ", ".join(repr(str(v)) for v in value) + "]"
        parts.append(f"'{key}': {value}")
    return "\n ".join(parts)
