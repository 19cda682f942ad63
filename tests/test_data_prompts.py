"""Prompt building with a token budget, item text, and the output parser."""

import pytest

from rporec_jax.data import PromptBuilder, PromptConfig, SyntheticConfig, clean_text, instruction_for, item_msg
from rporec_jax.data import parse_output
from rporec_jax.data.testing import tiny_chat_tokenizer


@pytest.fixture(scope="module")
def setup():
    data = SyntheticConfig(num_users=20).load()
    cfg = PromptConfig(max_prompt_tokens=200)
    instr = instruction_for(data.name, cfg)
    tok = tiny_chat_tokenizer(data.item_texts + [instr, cfg.system])
    return data, cfg, instr, tok


def test_item_text():
    assert clean_text("Caf\u00e9 &amp; <b>bar</b>\n") == "Caf & bar"
    assert item_msg([("title", "T"), ("description", ["b", "a"])]) == "'title': T\n 'description': ['b', 'a']"


def test_instruction_templates():
    cfg = PromptConfig()
    for name in ("amazon2023-CDs_and_Vinyl", "amazon2023-Video_Games", "amazon2023-Musical_Instruments",
                 "lcrec-Scientific", "movielens-100k", "synthetic"):
        text = instruction_for(name, cfg)
        assert "<answer></answer>" in text and "<think></think>" in text
    assert "CDs and Vinyl" in instruction_for("amazon2023-CDs_and_Vinyl", cfg)
    assert "title, year, genres" in instruction_for("movielens-1m", cfg)
    with pytest.raises(ValueError, match="no instruction template"):
        instruction_for("unknown", cfg)
    assert instruction_for("unknown", PromptConfig(instruction="Custom.")).startswith("Custom. ")


def test_chat_rendering_matches_template(setup):
    data, cfg, instr, tok = setup
    b = PromptBuilder(data.item_texts, instr, cfg, tok)
    hist = [3, 0, 5]
    msgs = b.messages(hist)
    assert msgs[0] == {"role": "system", "content": cfg.system}
    assert msgs[1]["content"] == instr + "\n" + data.item_texts[3] + "\n" + data.item_texts[5]
    full = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert b.text(hist) == full and full.endswith("<|im_start|>assistant\n")
    ids, dropped = b.encode([hist])[0]
    assert dropped == 0
    assert ids == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_budget_drops_oldest_items_only(setup):
    data, cfg, instr, tok = setup
    b = PromptBuilder(data.item_texts, instr, cfg, tok)
    hist = list(range(1, 21))
    (ids, dropped), (short_ids, short_dropped) = b.encode([hist, hist[-1:]])
    assert short_dropped == 0 and 0 < dropped < len(hist)
    assert len(ids) <= cfg.max_prompt_tokens
    # Exactly the most recent items that fit are kept, and keeping one more would not fit.
    assert ids == tok(b.text(hist[dropped:]), add_special_tokens=False)["input_ids"]
    assert len(tok(b.text(hist[dropped - 1 :]), add_special_tokens=False)["input_ids"]) > cfg.max_prompt_tokens
    assert b.text(hist[dropped:]).count(instr) == 1


def test_budget_never_drops_instruction(setup):
    data, _, instr, tok = setup
    b = PromptBuilder(data.item_texts, instr, PromptConfig(max_prompt_tokens=20), tok)
    with pytest.raises(ValueError, match="instruction alone renders to"):
        b.encode([[1, 2]])


def test_item_char_cap(setup):
    data, _, instr, tok = setup
    b = PromptBuilder(data.item_texts, instr, PromptConfig(max_item_chars=12), tok)
    assert b.item_texts[1] == data.item_texts[1][:12].rstrip() + " ..."


@pytest.mark.parametrize("text,expected", [
    ("<think> r </think> m <answer> a </answer> p", ("", "r", " m ", "a", " p", 1)),
    ("pre<think>r</think><answer>a</answer>", ("pre", "r", "", "a", "", 1)),
    ("", ("", "", "", "", "", 0)),
    ("just text", ("", "", "just text", "", "", 0)),
    ("<think>r</think> no answer", ("", "r", " no answer", "", "", 0)),
    ("r</think><answer>a</answer>", ("", "r", "", "a", "", 0)),  # missing opening tag
    ("<think>r unfinished", ("", "r unfinished", "", "", "", 0)),
    ("<think>r</think><answer>a", ("", "r", "", "a", "", 0)),  # unclosed answer
    ("<think>a<think>b</think>c</think><answer>x</answer>", ("", "a<think>b", "c</think>", "x", "", 0)),  # nested
    ("<think>r</think><answer>a</answer><answer>b</answer>", ("", "r", "", "a", "<answer>b</answer>", 0)),
    ("<think> </think><answer>a</answer>", ("", "", "", "a", "", 0)),  # empty CoT
    ("<think>r</think><answer> </answer>", ("", "r", "", "", "", 0)),  # empty answer
    ("<answer>a</answer><think>r</think>", ("<answer>a</answer>", "r", "", "", "", 0)),  # wrong order
])
def test_parse_output(text, expected):
    p = parse_output(text)
    assert (p.pre, p.cot, p.mid, p.answer, p.post, p.format_ok) == expected


def test_parse_output_assume_think_open():
    p = parse_output(" r </think><answer>a</answer>", assume_think_open=True)
    assert (p.cot, p.answer, p.format_ok) == ("r", "a", 1)
