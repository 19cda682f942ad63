"""A word-level tokenizer over `w0 .. w{n-1}` (ids = word numbers) for fast sampler tests."""

from __future__ import annotations


def make_tiny_tokenizer(vocab_size: int = 64):
    """Returns a PreTrainedTokenizerFast whose token i is the word `w{i}`; w1 is EOS, w0 is padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w0", unk_token="w2")
