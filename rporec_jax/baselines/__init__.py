"""Baselines evaluated on the same splits and full-ranking metrics as the Rechead: most-popular and SASRec."""

from rporec_jax.baselines.popularity import evaluate_popularity, popularity_counts, popularity_scores
from rporec_jax.baselines.sasrec import SASRec, SASRecConfig, evaluate_sasrec, sasrec_user_vectors, train_sasrec

__all__ = ["SASRec", "SASRecConfig", "evaluate_popularity", "evaluate_sasrec", "popularity_counts",
           "popularity_scores", "sasrec_user_vectors", "train_sasrec"]
