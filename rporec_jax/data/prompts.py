"""Instruction templates, chat messages and token-budgeted prompt encoding for history -> next item prompts."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar, Sequence

import numpy as np

from rporec_jax.data.ranges import Range, check_ranges

_FORMAT = (
    "First think step by step inside <think></think>: briefly analyse the user's preferences and how they change "
    "over time. Then write your guess of the next item's attributes inside <answer></answer>, in the same format "
    "as the items above ({fields})."
)
_HISTORY = "Below is the {what} history of a user {where}, one item per entry, from oldest to most recent."

# Keyed by dataset name (exact, then the part before '-'); `{fields}` names the item fields of that source.
INSTRUCTIONS = {
    "amazon2023-CDs_and_Vinyl": _HISTORY.format(what="purchase", where="on Amazon in CDs and Vinyl"),
    "amazon2023-Video_Games": _HISTORY.format(what="purchase", where="on Amazon in Video Games"),
    "amazon2023-Musical_Instruments": _HISTORY.format(what="purchase", where="on Amazon in Musical Instruments"),
    "amazon2023": _HISTORY.format(what="purchase", where="on Amazon"),
    "lcrec-Scientific": _HISTORY.format(what="purchase", where="on Amazon in Industrial and Scientific products"),
    "lcrec": _HISTORY.format(what="purchase", where="on Amazon"),
    "movielens": _HISTORY.format(what="movie rating", where="on MovieLens"),
    "synthetic": _HISTORY.format(what="purchase", where="in an online shop"),
}
ITEM_FIELDS = {
    "amazon2023": "title, average_rating, rating_number, description",
    "lcrec": "title, brand, categories, description",
    "movielens": "title, year, genres",
    "synthetic": "title, category, color, material",
}
SYSTEM = "You are a helpful assistant. You analyse a user's history and recommend the next item."


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Prompt wording and limits. Empty `instruction` picks the dataset's template from `INSTRUCTIONS`.

    `system_role` is 'system' by default; the reference passed its system text with role 'assistant'.
    `max_prompt_tokens` bounds the rendered chat prompt; oldest history items are dropped to fit.
    `max_item_chars` (0 = off) shortens each item's text in the prompt, so one long item cannot eat the budget.
    """

    instruction: str = ""
    system: str = SYSTEM
    system_role: str = "system"
    max_prompt_tokens: int = 1024
    max_item_chars: int = 0

    RANGES: ClassVar[dict[str, Range]] = {"max_prompt_tokens": Range(1), "max_item_chars": Range(0, note="0 = off")}

    def __post_init__(self):
        check_ranges(self)


def instruction_for(dataset: str, cfg: PromptConfig) -> str:
    """Returns the full instruction (history description + output format) for `dataset`."""
    family = dataset.split("-", 1)[0]
    if cfg.instruction:
        head = cfg.instruction
    elif dataset in INSTRUCTIONS or family in INSTRUCTIONS:
        head = INSTRUCTIONS.get(dataset, INSTRUCTIONS.get(family))
    else:
        raise ValueError(f"no instruction template for dataset {dataset!r}; set PromptConfig.instruction")
    return head + " " + _FORMAT.format(fields=ITEM_FIELDS.get(family, "the same fields"))


class PromptBuilder:
    """Builds chat prompts from history item ids and encodes them within the token budget."""

    def __init__(self, item_texts: Sequence[str], instruction: str, cfg: PromptConfig, tokenizer=None):
        self.cfg, self.instruction, self.tokenizer = cfg, instruction, tokenizer
        cap = cfg.max_item_chars
        self.item_texts = [t if not cap or len(t) <= cap else t[:cap].rstrip() + " ..." for t in item_texts]
        self._prefix_suffix = None
        self._item_tokens = None

    def user_content(self, history: Sequence[int]) -> str:
        """Returns the user message: instruction, then one item text per line, oldest first."""
        return self.instruction + "\n" + "\n".join(self.item_texts[int(i)] for i in history if int(i) > 0)

    def messages(self, history: Sequence[int]) -> list[dict]:
        """Returns the chat messages [system, user] for a history of item ids (0s ignored)."""
        return [
            {"role": self.cfg.system_role, "content": self.cfg.system},
            {"role": "user", "content": self.user_content(history)},
        ]

    def text(self, history: Sequence[int]) -> str:
        """Returns the chat-template rendering of the prompt, ending with the generation prompt."""
        if self.tokenizer is None:
            raise ValueError("rendering a chat prompt needs a tokenizer with a chat template")
        if self._prefix_suffix is None:
            self._prefix_suffix = self._split_template()
        if self._prefix_suffix is False:
            return self._render(self.user_content(history))
        prefix, suffix = self._prefix_suffix
        return prefix + self.user_content(history) + suffix

    def _render(self, content: str) -> str:
        msgs = [{"role": self.cfg.system_role, "content": self.cfg.system}, {"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _split_template(self):
        # Rendering the Jinja template per prompt dominates preparation time; templates that insert the user
        # content verbatim can be rendered once around a sentinel. Verified on a real content, else not used.
        sentinel = "\x00RPOREC_CONTENT\x00"
        full = self._render(sentinel)
        if full.count(sentinel) != 1:
            return False
        prefix, suffix = full.split(sentinel)
        probe = self.instruction + "\n probe item"
        return (prefix, suffix) if self._render(probe) == prefix + probe + suffix else False

    def _ids(self, texts: list[str]) -> list[list[int]]:
        # The rendered template already contains BOS/role tokens, so none are added here.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, histories: Sequence[Sequence[int]]) -> list[tuple[list[int], int]]:
        """Returns (prompt token ids, number of oldest history items dropped to fit the budget) per history."""
        budget = self.cfg.max_prompt_tokens
        hists = [[int(i) for i in h if int(i) > 0] for h in histories]
        ids = self._ids([self.text(h) for h in hists])
        dropped = [0] * len(hists)
        over = [i for i, x in enumerate(ids) if len(x) > budget]
        if not over:
            return list(zip(ids, dropped))
        if self._item_tokens is None:
            self._item_tokens = np.asarray([len(x) for x in self._ids(["\n" + t for t in self.item_texts])])
        # Estimate how many oldest items to drop from per-item token counts, then confirm by re-encoding in
        # batches (token boundaries between items can make the estimate slightly off either way).
        for i in over:
            saved = np.cumsum(self._item_tokens[hists[i]])
            dropped[i] = min(int(np.searchsorted(saved, len(ids[i]) - budget)) + 1, len(hists[i]))
        todo = over
        while todo:
            enc = self._ids([self.text(hists[i][dropped[i] :]) for i in todo])
            still = []
            for i, x in zip(todo, enc):
                if len(x) <= budget:
                    ids[i] = x
                elif dropped[i] == len(hists[i]):
                    raise ValueError(
                        f"the instruction alone renders to {len(x)} tokens, over max_prompt_tokens={budget}; "
                        "raise the budget or shorten the instruction (it is never truncated)")
                else:
                    dropped[i] += 1
                    still.append(i)
            todo = still
        # Give back items while they still fit, so no prompt drops more history than needed.
        todo = [i for i in over if dropped[i] > 0]
        while todo:
            enc = self._ids([self.text(hists[i][dropped[i] - 1 :]) for i in todo])
            still = []
            for i, x in zip(todo, enc):
                if len(x) <= budget:
                    ids[i], dropped[i] = x, dropped[i] - 1
                    if dropped[i] > 0:
                        still.append(i)
            todo = still
        return list(zip(ids, dropped))


def tokenizer_fingerprint(tokenizer) -> str:
    """Returns a hex digest of the tokenizer's vocabulary, merges, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    h.update(repr(getattr(tokenizer, "all_special_tokens", None)).encode())
    return h.hexdigest()
