"""Models: the causal decoder backbone, its weights (HF safetensors / GGUF) and its tokenizer.

    model = load_model("path/to/hf_dir_or_file.gguf", dtype="float32")
    logits = model.apply(model.params, tokens)          # [batch, seq, vocab]
    save_model(model, "out_dir")                        # loadable by transformers.from_pretrained
"""

from rporec_jax.models.decoder import Decoder, DecoderOutput, KVCache, init_cache, positions_from_mask
from rporec_jax.models.decoder_config import DecoderConfig
from rporec_jax.models.loading import Model, load_model, save_model, to_hf_config
from rporec_jax.models.tokenizer import load_tokenizer

__all__ = ["Decoder", "DecoderConfig", "DecoderOutput", "KVCache", "Model", "init_cache", "load_model",
           "load_tokenizer", "positions_from_mask", "save_model", "to_hf_config"]
