"""hidden_state Rechead inputs: last-token hidden states equal the unpadded forward's, whatever the batch; the
item states are cached per (model, texts)."""

import jax
import numpy as np
import pytest

from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params
from rporec_jax.models.tiny import tiny_decoder
from rporec_jax.train import hidden_features
from rporec_jax.train.hidden_features import item_hidden_matrix, last_hidden_states

CONFIG = DecoderConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)


def test_last_hidden_states_match_single_forward(mesh1):
    model = Model(CONFIG, init_params(CONFIG, jax.random.key(0), mesh1), mesh=mesh1)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 64, n)) for n in (3, 17, 9, 1, 30)]
    out = last_hidden_states(model, seqs, batch_size=2, buckets=(16, 32), progress=False)
    for s, row in zip(seqs, out):
        alone = np.asarray(model.forward(model.params, np.array([s]), compute_logits=False).hidden[0, -1])
        np.testing.assert_allclose(row, alone, atol=1e-5)


def test_item_hidden_matrix_is_cached_per_model_and_texts(tmp_path, monkeypatch, mesh1):
    monkeypatch.setenv("RPOREC_CACHE_DIR", str(tmp_path))
    texts = ["", "red shoe", "blue hat for rain", "green sock"]
    model = tiny_decoder(texts, jax.random.key(0), mesh1)
    first = item_hidden_matrix(model, texts)
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[1:]]
    np.testing.assert_array_equal(first[0], 0.0)  # padding row
    np.testing.assert_allclose(first[1:], last_hidden_states(model, ids, progress=False), atol=1e-6)
    assert len(list((tmp_path / "item_hidden").glob("*.npy"))) == 1

    def no_forward(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(hidden_features, "last_hidden_states", no_forward)
    np.testing.assert_array_equal(item_hidden_matrix(model, texts), first)  # read back, bit for bit
    with pytest.raises(AssertionError, match="recomputed"):  # other texts: another entry
        item_hidden_matrix(model, texts[:3])
    with pytest.raises(AssertionError, match="recomputed"):  # other weights: another entry
        item_hidden_matrix(tiny_decoder(texts, jax.random.key(1), mesh1), texts)
