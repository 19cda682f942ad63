"""A tiny word-level chat tokenizer for fast tests and smoke runs (no model download, builds in milliseconds)."""

from __future__ import annotations

from typing import Iterable

from rporec_jax.data.parser import TAGS

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def tiny_chat_tokenizer(texts: Iterable[str] = (), multiple_of: int = 1, whole_tags: bool = False):
    """Returns a `transformers.PreTrainedTokenizerFast` (word/punctuation tokens from `texts`, im_start chat
    template); filler words `<extra_k>` round the vocabulary up to a multiple of `multiple_of` (shardable).
    `whole_tags`: the four format tags are single tokens that decode to themselves (budget forcing can write them;
    otherwise `</think>` splits into `</`, which is not a word, and decodes to `<unk> think >`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    # The chat template's role names and tag text are always in the vocabulary.
    texts = [*texts, "system user assistant <think></think> <answer></answer>"]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)} - set(SPECIAL))
    tags = list(TAGS) if whole_tags else []
    words += tags  # after the words: the other ids stay those of the tokenizer without them
    words += [f"<extra_{k}>" for k in range(-(len(SPECIAL) + len(words)) % multiple_of)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=SPECIAL[2:])
    tok.chat_template = CHAT_TEMPLATE
    if tags:  # matched before pre-tokenization, each to its vocabulary id
        tok.add_tokens(tags)
    return tok
