"""A word-level tokenizer over `w0 .. w{n-1}` (ids = word numbers) for fast sampler tests."""

from __future__ import annotations


def make_tiny_tokenizer(vocab_size: int = 64, tags: bool = False):
    """Returns a PreTrainedTokenizerFast whose token i is the word `w{i}`; w1 is EOS, w0 is padding. `tags`: the
    last four ids are the format tags `<think>`, `</think>`, `<answer>`, `</answer>` instead (whole words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rporec_jax.data.parser import TAGS

    words = [f"w{i}" for i in range(vocab_size - (len(TAGS) if tags else 0))] + (list(TAGS) if tags else [])
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w0", unk_token="w2")
