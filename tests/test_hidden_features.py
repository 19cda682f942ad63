"""hidden_state Rechead inputs: last-token hidden states equal the unpadded forward's, whatever the batch."""

import jax
import numpy as np

from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params
from rporec_jax.train.hidden_features import last_hidden_states

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
