"""Tiny randomly initialised transformers models (Llama, Qwen2, Qwen3) saved to disk for parity tests."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)

VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3_rope_tied": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 32}),
    "llama_linear_rope": dict(model_type="llama", tie_word_embeddings=False,
                              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def make_hf_model(variant: str, seed: int = 0):
    """Returns a float32 transformers CausalLM with every weight (norms and biases too) randomised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(VARIANTS[variant])
    config = AutoConfig.for_model(kw.pop("model_type"), **TINY, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random norms/biases catch mapping mistakes that ones/zeros would hide
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if "norm" in name else 0.0))
    return model


def save_hf_model(variant: str, out_dir, seed: int = 0):
    """Saves a tiny random model of `variant` to `out_dir` and returns the torch model."""
    model = make_hf_model(variant, seed)
    model.save_pretrained(str(out_dir))
    return model


def hf_logits(model, tokens, mask=None):
    """Returns transformers' float32 logits as NumPy for int tokens [batch, seq]."""
    with torch.no_grad():
        t = torch.as_tensor(tokens, dtype=torch.long)
        m = None if mask is None else torch.as_tensor(mask, dtype=torch.long)
        return model(input_ids=t, attention_mask=m).logits.float().numpy()
