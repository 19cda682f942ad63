"""Data: sources -> interactions -> sliding-window instances -> prompts -> ArrayRecord datasets -> grain loaders."""

from rporec_jax.data.interactions import Interactions, build_interactions, interaction_stats
from rporec_jax.data.items import clean_text, item_msg
from rporec_jax.data.negatives import sample_negatives
from rporec_jax.data.parser import ParsedOutput, parse_output
from rporec_jax.data.pipeline import LoaderConfig, bucket_length, make_loader, whole_split_loader
from rporec_jax.data.prompts import PromptBuilder, PromptConfig, instruction_for
from rporec_jax.data.rows import DataError, RowReport
from rporec_jax.data.sources import (
    Amazon2023Config, LCRecConfig, MovieLensConfig, SyntheticConfig, next_item_probs, source_config,
)
from rporec_jax.data.splits import SPLITS, Instances, SplitConfig, make_instances
from rporec_jax.data.storage import DataConfig, PreparedDataset, load_dataset, open_dataset, prepare_dataset

__all__ = [
    "Amazon2023Config", "DataConfig", "DataError", "Instances", "Interactions", "LCRecConfig", "LoaderConfig",
    "MovieLensConfig", "ParsedOutput", "PreparedDataset", "PromptBuilder", "PromptConfig", "RowReport", "SPLITS",
    "SplitConfig", "SyntheticConfig", "bucket_length", "build_interactions", "clean_text", "instruction_for",
    "interaction_stats", "item_msg", "load_dataset", "make_instances", "make_loader", "next_item_probs",
    "open_dataset", "parse_output", "prepare_dataset", "sample_negatives", "source_config", "whole_split_loader",
]
