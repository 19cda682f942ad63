"""Seeded synthetic catalogue and users whose category preference drifts, with a known next-item distribution.

Each user carries a hidden category state c_t. Item t is drawn uniformly from the catalogue with probability
`noise`, otherwise from category c_t by a Zipf popularity. Then c_{t+1} = c_t with probability `stay`, else
(c_t + 1) mod C: preferences drift around the category ring. `next_item_probs` gives the exact distribution of
the next item given the hidden state, the upper bound a recommender can reach.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from rporec_jax.data.interactions import Interactions, build_interactions
from rporec_jax.data.items import item_msg
from rporec_jax.data.ranges import Range, check_ranges
from rporec_jax.data.rows import RowReport

CATEGORIES = ("lamp", "chair", "kettle", "backpack", "guitar", "novel", "sneaker", "watch", "camera", "plant",
              "mug", "jacket", "puzzle", "speaker", "tent", "bicycle")
COLORS = ("red", "blue", "green", "black", "white", "yellow", "grey", "orange")
MATERIALS = ("wooden", "steel", "plastic", "leather", "glass", "cotton", "ceramic", "bamboo")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and dynamics of the synthetic dataset; the same config and seed always give the same data."""

    num_users: int = 200
    num_categories: int = 8
    items_per_category: int = 16
    min_len: int = 6
    max_len: int = 24
    stay: float = 0.7
    noise: float = 0.05
    zipf: float = 1.0
    seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "num_users": Range(1), "num_categories": Range(1, len(CATEGORIES)), "items_per_category": Range(1),
        "min_len": Range(2), "max_len": Range(2), "stay": Range(0, 1), "noise": Range(0, 1), "zipf": Range(0),
        "seed": Range(0),
    }

    def __post_init__(self):
        check_ranges(self)
        if self.min_len > self.max_len:
            raise ValueError(f"SyntheticConfig.min_len={self.min_len} exceeds max_len={self.max_len}")

    @property
    def name(self) -> str:
        """Returns the dataset name used for prompt templates and directory names."""
        return "synthetic"

    @property
    def num_items(self) -> int:
        """Returns N = categories x items per category."""
        return self.num_categories * self.items_per_category

    def files(self) -> list:
        """Returns [] (the data is generated from the config alone)."""
        return []

    def load(self) -> Interactions:
        """Returns the generated interactions; `extra['state']` holds each event's hidden category."""
        return generate(self)


def item_category(cfg: SyntheticConfig, item: np.ndarray | int) -> np.ndarray:
    """Returns the category of dense item id(s) 1..N (item i belongs to category (i-1) // items_per_category)."""
    return (np.asarray(item) - 1) // cfg.items_per_category


def _popularity(cfg: SyntheticConfig) -> np.ndarray:
    w = 1.0 / np.arange(1, cfg.items_per_category + 1) ** cfg.zipf
    return w / w.sum()


def next_item_probs(cfg: SyntheticConfig, state: int) -> np.ndarray:
    """Returns float64 [N+1] P(next item | current hidden category `state`); entry 0 (padding) is 0."""
    pop = _popularity(cfg)
    c, m = cfg.num_categories, cfg.items_per_category
    p = np.full(cfg.num_items + 1, cfg.noise / cfg.num_items)
    p[0] = 0.0
    for cat, w in ((state, cfg.stay), ((state + 1) % c, 1.0 - cfg.stay)):
        p[1 + cat * m : 1 + (cat + 1) * m] += (1.0 - cfg.noise) * w * pop
    return p


def generate(cfg: SyntheticConfig) -> Interactions:
    """Returns a synthetic `Interactions` with item texts (title, category, color, material) and timestamps."""
    rng = np.random.default_rng(cfg.seed)
    m = cfg.items_per_category
    texts = {}
    for i in range(cfg.num_items):
        cat = CATEGORIES[i // m]
        color, material = COLORS[rng.integers(len(COLORS))], MATERIALS[rng.integers(len(MATERIALS))]
        texts[i] = item_msg([("title", f"{color.title()} {material} {cat} no. {i % m + 1}"),
                             ("category", cat), ("color", color), ("material", material)])
    pop = _popularity(cfg)
    events, states = [], {}
    for u in range(cfg.num_users):
        length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        c = int(rng.integers(cfg.num_categories))
        t = int(rng.integers(0, 1_000_000))
        st = []
        for _ in range(length):
            st.append(c)
            if rng.random() < cfg.noise:
                item = int(rng.integers(cfg.num_items))
            else:
                item = c * m + int(rng.choice(m, p=pop))
            events.append((u, item, t))
            t += int(rng.integers(1, 50_000))
            if rng.random() >= cfg.stay:
                c = (c + 1) % cfg.num_categories
        states[u] = np.asarray(st, dtype=np.int32)
    # Keeping unused items makes dense id = raw index + 1, which `item_category` relies on.
    data = build_interactions(cfg.name, events, texts, RowReport(), keep_unused_items=True)
    data.extra["state"] = [states[int(k)] for k in data.user_keys]
    return data
