"""Our decoder vs transformers' PyTorch models, tiny random Llama / Qwen2 / Qwen3 (float32)."""

import numpy as np
import pytest

from hf_tiny import VARIANTS, hf_logits, save_hf_model
from rporec_jax.models import load_model


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path, mesh1):
    ref = save_hf_model(variant, tmp_path)
    model = load_model(tmp_path, mesh=mesh1, tokenizer=False)
    tokens = np.random.default_rng(0).integers(0, 96, size=(2, 40))  # past llama3's 32-token original context
    ours = np.asarray(model.apply(model.params, tokens))
    assert ours.shape == (2, 40, 96)
    assert _rel_err(ours, hf_logits(ref, tokens)) <= 1e-4
