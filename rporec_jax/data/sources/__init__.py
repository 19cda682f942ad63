"""Dataset sources: each turns files (or a seed) into `Interactions`; `SOURCES` maps a kind name to its config."""

from __future__ import annotations

from rporec_jax.data.sources.amazon2023 import Amazon2023Config
from rporec_jax.data.sources.lcrec import LCRecConfig
from rporec_jax.data.sources.movielens import MovieLensConfig
from rporec_jax.data.sources.synthetic import SyntheticConfig, next_item_probs

SOURCES = {
    "amazon2023": Amazon2023Config,
    "lcrec": LCRecConfig,
    "movielens": MovieLensConfig,
    "synthetic": SyntheticConfig,
}

SourceConfig = Amazon2023Config | LCRecConfig | MovieLensConfig | SyntheticConfig


def source_config(kind: str, **kwargs) -> SourceConfig:
    """Returns the config dataclass of source `kind` built from keyword arguments."""
    if kind not in SOURCES:
        raise ValueError(f"unknown source {kind!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[kind](**kwargs)


__all__ = ["SOURCES", "SourceConfig", "source_config", "Amazon2023Config", "LCRecConfig", "MovieLensConfig",
           "SyntheticConfig", "next_item_probs"]
