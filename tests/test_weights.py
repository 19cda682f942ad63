"""Checkpoint loading errors, sharded safetensors, and export back to transformers."""

import json

import numpy as np
import pytest
import torch

from hf_tiny import hf_logits, save_hf_model
from rporec_jax.models import load_model, save_model
from rporec_jax.models.safetensors_io import write_sharded
from rporec_jax.models.weights import SafetensorsDir


def _rewrite(src_dir, dst_dir, edit):
    """Copies an HF dir with its tensors passed through `edit(dict) -> dict`."""
    dst_dir.mkdir()
    (dst_dir / "config.json").write_text((src_dir / "config.json").read_text())
    tensors = {k: np.array(v) for k, v in SafetensorsDir(src_dir).items()}
    write_sharded(dst_dir, edit(tensors))


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    return d, save_hf_model("qwen2", d)


def test_export_round_trip_through_transformers(qwen2_dir, tmp_path, mesh1):
    from transformers import AutoModelForCausalLM

    src, _ = qwen2_dir
    model = load_model(src, mesh=mesh1, tokenizer=False)
    out = save_model(model, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 96, (2, 12))
    np.testing.assert_allclose(hf_logits(reloaded, tokens), np.asarray(model.apply(model.params, tokens)),
                               atol=1e-4, rtol=1e-4)


def test_bfloat16_export_loads_in_transformers(qwen2_dir, tmp_path, mesh1):
    from transformers import AutoModelForCausalLM

    src, ref = qwen2_dir
    model = load_model(src, mesh=mesh1, tokenizer=False)
    out = save_model(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    ours_bf16 = load_model(out, mesh=mesh1, tokenizer=False)  # our reader handles bfloat16 too
    tokens = np.random.default_rng(0).integers(0, 96, (1, 10))
    a, b = np.asarray(ours_bf16.apply(ours_bf16.params, tokens)), hf_logits(ref, tokens)
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 3e-2


def test_sharded_checkpoint_with_index(qwen2_dir, tmp_path, mesh1):
    src, ref = qwen2_dir
    _rewrite(src, tmp_path / "sharded", lambda t: t)
    write_sharded(tmp_path / "sharded", {k: np.array(v) for k, v in SafetensorsDir(src).items()},
                  max_shard_bytes=50_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    (tmp_path / "sharded" / "model.safetensors").unlink()
    model = load_model(tmp_path / "sharded", mesh=mesh1, tokenizer=False)
    tokens = np.arange(10)[None]
    np.testing.assert_allclose(np.asarray(model.apply(model.params, tokens)), hf_logits(ref, tokens),
                               atol=1e-4, rtol=1e-4)


def test_missing_tensor_is_named(qwen2_dir, tmp_path, mesh1):
    name = "model.layers.1.self_attn.k_proj.bias"
    _rewrite(qwen2_dir[0], tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        load_model(tmp_path / "m", mesh=mesh1, tokenizer=False)


def test_unexpected_tensor_is_named(qwen2_dir, tmp_path, mesh1):
    _rewrite(qwen2_dir[0], tmp_path / "u", lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_model(tmp_path / "u", mesh=mesh1, tokenizer=False)


def test_shape_mismatch_is_named(qwen2_dir, tmp_path, mesh1):
    bad = "model.layers.2.mlp.up_proj.weight"
    _rewrite(qwen2_dir[0], tmp_path / "s", lambda t: {**t, bad: t[bad][:-1]})
    with pytest.raises(ValueError, match=bad.replace(".", r"\.") + r".*expects \(64, 96\)"):
        load_model(tmp_path / "s", mesh=mesh1, tokenizer=False)
