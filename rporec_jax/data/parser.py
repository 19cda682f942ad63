"""Parsing of generated `<think> CoT </think> ... <answer> ... </answer>` outputs."""

from __future__ import annotations

import dataclasses

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
    """The five parts of a completion and the format flag (1 = exactly one of each tag, in order, non-empty)."""

    pre: str
    cot: str
    mid: str
    answer: str
    post: str
    format_ok: int


def parse_output(text: str, assume_think_open: bool = False) -> ParsedOutput:
    """Returns the `ParsedOutput` of `text`; never raises.

    pre/mid/post keep their raw characters (the length reward counts them); cot and answer are stripped.
    Extraction is best effort when the format is broken: cot spans the first `<think>` to the first `</think>`
    after it (from the start of the text when `<think>` is missing but `</think>` is present); answer spans the
    first `<answer>` after the CoT to the next `</answer>`. `assume_think_open` is for chat templates whose
    generation prompt already ends in `<think>`: the text is read as if it started with that tag.
    """
    if assume_think_open:
        text = TAGS[0] + text
    counts = [text.count(t) for t in TAGS]
    pre, cot, rest = "", "", text
    open_i = text.find(TAGS[0])
    close_i = text.find(TAGS[1], open_i + len(TAGS[0]) if open_i >= 0 else 0)
    if close_i >= 0:
        if 0 <= open_i < close_i:
            pre, cot = text[:open_i], text[open_i + len(TAGS[0]) : close_i]
        else:
            cot = text[:close_i]
        rest = text[close_i + len(TAGS[1]) :]
    elif open_i >= 0:
        # Unclosed <think>: everything after it is (truncated) reasoning, nothing can be an answer.
        return ParsedOutput(text[:open_i], text[open_i + len(TAGS[0]) :].strip(), "", "", "", 0)
    mid, answer, post = rest, "", ""
    a_open = rest.find(TAGS[2])
    if a_open >= 0:
        a_close = rest.find(TAGS[3], a_open + len(TAGS[2]))
        if a_close >= 0:
            mid, answer, post = rest[:a_open], rest[a_open + len(TAGS[2]) : a_close], rest[a_close + len(TAGS[3]) :]
        else:
            mid, answer = rest[:a_open], rest[a_open + len(TAGS[2]) :]
    cot, answer = cot.strip(), answer.strip()
    ok = (
        counts == [1, 1, 1, 1]
        and 0 <= open_i < close_i
        and a_open >= 0
        and TAGS[3] in rest[a_open:]
        and bool(cot)
        and bool(answer)
    )
    return ParsedOutput(pre, cot, mid, answer, post, int(ok))
