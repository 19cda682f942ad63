"""End to end on the synthetic dataset: a trained Rechead beats most-popular under full ranking."""

import jax
import numpy as np
import pytest

from rporec_jax.data import DataConfig, SyntheticConfig, load_dataset
from rporec_jax.models.rechead import RecheadConfig
from rporec_jax.models.tiny import word_static_encoder
from rporec_jax.train.features import item_matrix, rechead_examples
from rporec_jax.train.stage1 import Stage1Config, restore_best_rechead, run_stage1
from rporec_jax.train.state import OptimConfig


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cfg = DataConfig(source=SyntheticConfig(num_users=150, seed=0), num_negatives=20)
    return load_dataset(cfg, out_root=tmp_path_factory.mktemp("datasets"))


def test_examples_and_item_matrix(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("RPOREC_CACHE_DIR", str(tmp_path))
    enc = word_static_encoder(synthetic.item_texts[1:] + [synthetic.prompt_builder().user_content([1])])
    ex = rechead_examples(synthetic, "valid", enc, cot=None)
    n = len(ex["target"])
    assert ex["prompt_ids"].shape[0] == n and ex["negatives"].shape == (n, 20)
    assert (ex["format"] == 0).all() and not ex["cot_mask"].any()
    with pytest.raises(ValueError, match="have no CoT completion"):
        rechead_examples(synthetic, "valid", enc, cot={})
    m1 = item_matrix(enc, synthetic.item_texts)
    assert m1.shape == (synthetic.num_items + 1, 32) and not m1[0].any()
    assert len(list(tmp_path.glob("item_matrix/*.npy"))) == 1
    np.testing.assert_array_equal(item_matrix(enc, synthetic.item_texts), m1)  # cached


def test_trained_rechead_beats_most_popular(synthetic, tmp_path, monkeypatch):
    from rporec_jax.baselines.popularity import evaluate_popularity
    from rporec_jax.sharding import make_mesh

    monkeypatch.setenv("RPOREC_CACHE_DIR", str(tmp_path))
    builder = synthetic.prompt_builder()
    enc = word_static_encoder(synthetic.item_texts[1:] + [builder.user_content([1])])
    head = RecheadConfig(variant="prompt_only", dim=32, vocab_size=enc.config.vocab_size)
    cfg = Stage1Config(batch_size=64, epochs=12, optim=OptimConfig(lr=1e-2, total_steps=330),
                       checkpoint_dir=str(tmp_path / "ckpt"))
    state, report = run_stage1(synthetic, enc, head, cfg, eval_splits=("valid", "test"))

    # the best validation step is kept, checkpointed with orbax, and is what the final report measures
    valid_by_step = {s: e["valid_ndcg@10"] for row in report["history"] for s, e in row["evals"].items()}
    assert report["best_step"] == max(valid_by_step, key=valid_by_step.get)
    assert report["valid"]["ndcg@10"] == pytest.approx(max(valid_by_step.values()))
    step, restored = restore_best_rechead(str(tmp_path / "ckpt"), state.params["rechead"])
    assert step == report["best_step"]
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state.params["rechead"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    pop_metrics = evaluate_popularity(synthetic, "test", mesh=make_mesh(devices=jax.devices()[:1]))
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    assert report["test"]["count"] == pop_metrics["count"] > 0
    assert report["test"]["ndcg@10"] > 1.5 * pop_metrics["ndcg@10"] + 0.02, (report["test"], pop_metrics)


def test_hidden_state_rechead_runs_end_to_end(synthetic, tmp_path, monkeypatch, mesh1):
    from rporec_jax.data.testing import tiny_chat_tokenizer
    from rporec_jax.models import DecoderConfig, Model
    from rporec_jax.models.loading import init_params

    monkeypatch.setenv("RPOREC_CACHE_DIR", str(tmp_path))
    builder = synthetic.prompt_builder()
    tok = tiny_chat_tokenizer(synthetic.item_texts[1:] + [builder.user_content([1])])
    cfg = DecoderConfig("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=4096)
    llm = Model(cfg, init_params(cfg, jax.random.key(0), mesh1), tok, mesh=mesh1)
    head = RecheadConfig(variant="hidden_state", dim=16, input_dim=32)
    state, report = run_stage1(synthetic, None, head, Stage1Config(batch_size=32, epochs=1), llm=llm, limit=64,
                               eval_splits=("valid",))
    assert set(state.params["rechead"]) == {"user", "item_proj"}
    assert state.params["items"].shape == (synthetic.num_items + 1, 32)  # frozen LLM item states
    assert report["valid"]["count"] == 64 and 0 <= report["valid"]["ndcg@10"] <= 1
