"""Uniform negative items: real items 1..N other than the target (padding id 0 is never drawn)."""

from __future__ import annotations

import numpy as np


def sample_negatives(rng: np.random.Generator, num_items: int, targets, k: int) -> np.ndarray:
    """Returns int32 [*targets.shape, k] ids drawn uniformly (with replacement) from {1..N} minus each target."""
    if num_items < 2:
        raise ValueError(f"need at least 2 items to sample negatives, got {num_items}")
    targets = np.asarray(targets)
    # Draw from 1..N-1 and step over the target: uniform over the N-1 allowed ids without rejection loops.
    draw = rng.integers(1, num_items, size=(*targets.shape, k))
    return np.where(draw >= targets[..., None], draw + 1, draw).astype(np.int32)


def instance_rng(seed: int, *keys: int) -> np.random.Generator:
    """Returns a numpy Generator that depends only on (seed, keys), so draws do not depend on iteration order."""
    return np.random.default_rng([int(seed), *map(int, keys)])
