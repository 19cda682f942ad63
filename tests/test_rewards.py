"""Reward terms against hand-computed values, the composite's weights and gate, and the R2ec alternative."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from rporec_jax import rewards as rw
from rporec_jax.data.parser import parse_output

GOOD = "hi<think>abcdefghij</think>\n<answer>item</answer>"  # pre 'hi', post '' -> R_len 0.98, CoT 10 chars


# ------------------------------------------------------------------------------------------------ f, R_len

def test_format_gate():
    texts = [GOOD, "<think>a</think><answer>b</answer><answer>c</answer>", "no tags", "<think>a</think>"]
    np.testing.assert_array_equal(rw.format_gate([parse_output(t) for t in texts]), [1, 0, 0, 0])
    assert rw.format_gate([]).shape == (0,)


def test_length_reward():
    texts = [GOOD, "ab <think>c</think><answer>d</answer>xyz", "x" * 150 + "<think>c</think><answer>d</answer>",
             "<think>c</think><answer>d</answer>"]
    got = rw.length_reward([parse_output(t) for t in texts])
    np.testing.assert_allclose(got, [0.98, 0.94, 0.0, 1.0], rtol=1e-6)
    got10 = rw.length_reward([parse_output(texts[1])], length_scale=10.0)
    np.testing.assert_allclose(got10, [0.4], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ R_ndcg

def test_candidate_ranks_and_ndcg_with_ties():
    scores = np.array([
        [3.0, 1.0, 2.0, 0.0],       # best -> rank 1
        [2.0, 3.0, 1.0, 0.0],       # one higher -> 2
        [2.0, 2.0, 2.0, 1.0],       # two tied negatives count against the target -> 3
        [1.0, 1.0, 1.0, 1.0],       # constant scorer -> last (4)
        [np.nan, 0.0, 1.0, 2.0],    # NaN target -> last
        [1.0, np.nan, 0.0, 0.0],    # NaN negative is -inf -> 1
    ], np.float32)
    ranks = rw.target_ranks(scores)
    np.testing.assert_array_equal(ranks, [1, 2, 3, 4, 4, 1])
    np.testing.assert_allclose(rw.ndcg_reward(ranks), [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5),
                                                       1 / math.log2(5), 1.0], rtol=1e-6)
    with pytest.raises(ValueError):
        rw.ndcg_reward([0])


def test_full_catalogue_ranks_ignore_padding_and_extra_columns():
    scores = np.array([[100.0, 1.0, 5.0, 5.0, 0.0, 9.0]], np.float32)  # column 0 = padding, never ranked
    np.testing.assert_array_equal(rw.target_ranks(scores, [3], ranking="full"), [3])  # 9 higher, 5 tied
    np.testing.assert_array_equal(rw.target_ranks(scores, [3], num_items=4, ranking="full"), [2])
    with pytest.raises(ValueError):
        rw.target_ranks(scores, None, ranking="full")
    with pytest.raises(ValueError):
        rw.target_ranks(scores, [0], ranking="full")


def test_ranks_match_bruteforce_with_many_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(16, 12)).astype(np.float32)
    t = rng.integers(1, 12, size=16)
    brute_full = [1 + sum(s[b, j] > s[b, t[b]] for j in range(1, 12))
                  + sum(s[b, j] == s[b, t[b]] for j in range(1, 12) if j != t[b]) for b in range(16)]
    np.testing.assert_array_equal(rw.target_ranks(s, t, ranking="full"), brute_full)
    brute_cand = [1 + sum(s[b, j] >= s[b, 0] for j in range(1, 12)) for b in range(16)]
    np.testing.assert_array_equal(rw.target_ranks(s), brute_cand)


# ------------------------------------------------------------------------------------------------ R_comp, R_sim

def test_compression_reward():
    got = rw.compression_reward(["abcdefghij", "abcd", "", "abcd"], ["abc", "abcdefgh", "summary", ""])
    np.testing.assert_allclose(got, [0.3, 1.0, 0.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError):
        rw.compression_reward(["a"], [])


def test_similarity_reward_threshold_and_zero_vectors():
    a = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]], np.float32)
    b = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [-1, 0, 0, 0], [1, 0, 0, 0], [2, 4, 6, 8]], np.float32)
    # cos: 0.707, exactly 0.5 (not > 0.5), -1, zero vector, 1
    np.testing.assert_array_equal(rw.similarity_reward(a, b), [1, 0, 0, 0, 1])
    # a threshold below -1 would pass every real pair; zero vectors still give 0
    np.testing.assert_array_equal(rw.similarity_reward(a, b, threshold=-2.0), [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(rw.similarity_reward(a, b, threshold=0.8), [0, 0, 0, 0, 1])


# ------------------------------------------------------------------------------------------------ R_ent

def test_entropy_reward():
    n = 16
    e = np.full((5, n), 100.0)  # non-CoT tokens carry huge entropies that must be ignored
    m = np.zeros((5, n), bool)
    e[0, :5], m[0, :5] = [1, 2, 3, 4, 5], True               # k = 1: 5 - 3 = 2
    e[1, :10], m[1, :10] = np.arange(1, 11), True            # k = 2: 9.5 - 5.5 = 4
    e[2, 3:6], m[2, 3:6] = [1, 2, 6], True                   # n = 3: k = 1: 6 - 3 = 3
    e[3, :15], m[3, :15] = np.arange(1, 16), True            # k = 3: 14 - 8 = 6
    # row 4: no CoT tokens -> 0
    np.testing.assert_allclose(rw.entropy_reward(e, m), [2.0, 4.0, 3.0, 6.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(rw.entropy_reward(e[2:3], m[2:3], quantile=0.5), [1.0], rtol=1e-6)  # k=2: 4-3
    np.testing.assert_allclose(rw.entropy_reward(e[:1], m[:1], quantile=1.0), [0.0], atol=1e-7)
    # 0.28 * 25 = 7.000000000000001 in floating point: k must be 7 (top 19..25: 22 - 13 = 9), not 8
    e25, m25 = np.arange(1, 26, dtype=np.float64)[None], np.ones((1, 25), bool)
    np.testing.assert_allclose(rw.entropy_reward(e25, m25, quantile=0.28), [9.0], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ CoT token mask

VOCAB = ["<pad>", "<think>", "I", " like", " rock", " ", "</think>", "<answer>", "t", "</answer>", "ab",
         " ro", "ck</think>", "\n"]


def _decode(ids):
    return "".join(VOCAB[i] for i in ids)


def _ids(*pieces):
    return [VOCAB.index(p) for p in pieces]


def _pad(rows, n=14):
    tokens = np.zeros((len(rows), n), np.int32)
    mask = np.zeros((len(rows), n), bool)
    for r, row in enumerate(rows):
        tokens[r, :len(row)], mask[r, :len(row)] = row, True
    return tokens, mask


def test_cot_token_mask_marks_exactly_the_cot_tokens():
    rows = [
        _ids("ab", "<think>", " ", "I", " like", " rock", "\n", "</think>", "<answer>", "t", "</answer>"),
        _ids("<think>", "I", " ro", "ck</think>", "<answer>", "t", "</answer>"),   # token straddles </think>
        _ids("<think>", "I", " like"),                                              # unclosed
        _ids("ab", "<answer>", "t", "</answer>"),                                    # no CoT
        _ids("<think>", " ", "</think>", "<answer>", "t", "</answer>"),             # whitespace-only CoT
    ]
    tokens, mask = _pad(rows)
    got = rw.cot_token_mask(tokens, mask, _decode)
    want = np.zeros_like(mask)
    want[0, 3:6] = True
    want[1, 1:4] = True
    want[2, 1:3] = True
    np.testing.assert_array_equal(got, want)
    # the marked tokens decode to the parser's CoT (row 0)
    assert _decode(tokens[0][got[0]]) == parse_output(_decode(rows[0])).cot
    # an object with .decode works the same; so do precomputed prefix lengths
    np.testing.assert_array_equal(rw.cot_token_mask(tokens, mask, SimpleNamespace(decode=_decode)), want)
    lens = [rw.prefix_lengths(r, _decode)[0] for r in rows]
    np.testing.assert_array_equal(rw.cot_token_mask(tokens, mask, _decode, prefix_lens=lens), want)


def test_cot_token_mask_assume_think_open():
    tokens, mask = _pad([_ids("I", " like", "</think>", "<answer>", "t", "</answer>")])
    np.testing.assert_array_equal(rw.cot_token_mask(tokens, mask, _decode)[0, :3], [True, True, False])
    np.testing.assert_array_equal(rw.cot_token_mask(tokens, mask, _decode, assume_think_open=True)[0, :3],
                                  [True, True, False])
    # without </think>, only assume_think_open makes the text a CoT
    tokens, mask = _pad([_ids("I", " like")])
    assert not rw.cot_token_mask(tokens, mask, _decode).any()
    np.testing.assert_array_equal(rw.cot_token_mask(tokens, mask, _decode, assume_think_open=True)[0, :3],
                                  [True, True, False])


def test_cot_char_span_matches_parser():
    for text in [GOOD, "  <think>  x y </think>", "a</think>b", "<think> open", "none", "<think></think>",
                 "<think>a</think><think>b</think>"]:
        s, e = rw.cot_char_span(text)
        assert text[s:e] == parse_output(text).cot, text
    text = " x </think><answer>y</answer>"
    s, e = rw.cot_char_span(text, assume_think_open=True)
    assert text[s:e] == parse_output(text, assume_think_open=True).cot == "x"


def test_prefix_lengths_non_prefix_stable_decoder():
    # a decoder whose prefixes are not prefixes of the full text (a partial byte decoding to replacement
    # characters, say): lengths must stay non-decreasing and within the full text
    def dec(ids):
        text = _decode(ids)
        return text + "\ufffd" * 10 if ids and VOCAB[ids[-1]] == " " else text.rstrip(" ")

    lens, full = rw.prefix_lengths(_ids("I", " ", " like"), dec)
    assert full == "I  like"
    np.testing.assert_array_equal(lens, [0, 1, 7, 7])
    lens, _ = rw.prefix_lengths(_ids("I", " like", " "), lambda ids: _decode(ids).rstrip(" "))
    np.testing.assert_array_equal(lens, [0, 1, 6, 6])


# ------------------------------------------------------------------------------------------------ summaries

def test_extract_summary_edge_cases():
    cases = {
        "<answer> short summary </answer>": "short summary",
        "Sure! <answer>a</answer> then <answer>b</answer>": "a",          # repeated: first complete
        "<answer> draft <answer> final </answer>": "final",               # re-opened: innermost complete
        "</answer> junk <answer> s </answer> tail": "s",                  # stray close before the open
        "no tags here": "",
        "<answer> truncated at the token limit": "",
        "summary only closed </answer>": "",
        "<answer></answer>": "",
        "": "",
    }
    for text, want in cases.items():
        assert rw.extract_summary(text) == want, text


def test_extract_summary_ignores_tags_in_the_prompt():
    prompt = "user: Summarise ... Write only the summary, inside <answer></answer>.\nassistant: "
    assert rw.extract_summary(prompt + "I refuse.", prompt_text=prompt) == ""
    assert rw.extract_summary(prompt + "<answer>real</answer>", prompt_text=prompt) == "real"
    # the reference's bug: searching the whole decoded sequence finds the prompt's empty answer first
    assert rw.extract_summary(prompt + "<answer>real</answer>") == ""
    with pytest.raises(ValueError):
        rw.extract_summary("other" + "<answer>x</answer>", prompt_text=prompt)


def test_summary_prompt():
    msgs = rw.summary_prompt("the user likes jazz")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"].endswith("Reasoning:\nthe user likes jazz")
    assert "<answer></answer>" in msgs[1]["content"]
    assert rw.summary_prompt("x", system_role="assistant")[0]["role"] == "assistant"


class _FakeSampler:
    def __init__(self, temperature=0.0):
        self.config = SimpleNamespace(temperature=temperature, num_samples=1)
        self.calls = []

    def generate(self, prompts, key, params=None):
        self.calls.append(prompts)
        return SimpleNamespace(texts=[f"<answer>sum of {p[1]['content'][-3:]}</answer> extra" for p in prompts])


def test_generate_summaries_skips_empty_cots_and_needs_greedy():
    s = _FakeSampler()
    assert rw.generate_summaries(s, ["abc", "", "xyz"], key=None) == ["sum of abc", "", "sum of xyz"]
    assert len(s.calls) == 1 and len(s.calls[0]) == 2
    s = _FakeSampler()
    assert rw.generate_summaries(s, ["", ""], key=None) == ["", ""] and not s.calls
    with pytest.raises(ValueError):
        rw.generate_summaries(_FakeSampler(temperature=1.0), ["abc"], key=None)


# ------------------------------------------------------------------------------------------------ composite

def _inputs():
    texts = [GOOD, GOOD.replace("</answer>", ""), "x" * 30 + GOOD]  # row 1 breaks the format
    parsed = [parse_output(t) for t in texts]
    scores = np.array([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [2.0, 2.0, 3.0]], np.float32)  # ranks 1, 1, 3
    summaries = ["abcde", "abcde", "abcdefghijklmnop"]  # comp 0.5, 0.5, 1
    cot_emb = np.array([[1, 0], [1, 0], [1, 0]], np.float32)
    sum_emb = np.array([[1, 0.1], [1, 0.1], [0, 1]], np.float32)  # sim 1, 1, 0
    ent = np.zeros((3, 6))
    m = np.zeros((3, 6), bool)
    ent[:, :5], m[:, :5] = [1, 2, 3, 4, 5], True  # R_ent 2 on every row
    m[2] = False                                   # ... except row 2: no CoT tokens -> 0
    return parsed, scores, dict(summaries=summaries, cot_emb=cot_emb, summary_emb=sum_emb, entropies=ent, cot_mask=m)


def test_composite_reference_weights_and_format_gate():
    parsed, scores, kw = _inputs()
    total, terms = rw.compute_rewards(rw.RewardConfig(), parsed, scores, **kw)
    r0 = 0.1 + 0.1 * 0.98 + 0.5 * 1.0 + 0.1 * 0.5 + 0.1 * 1.0 + 0.1 * 2.0
    r2 = 0.1 + 0.1 * 0.68 + 0.5 * 0.5 + 0.1 * 1.0 + 0.0 + 0.0
    np.testing.assert_allclose(total, [r0, 0.0, r2], rtol=1e-6)
    np.testing.assert_array_equal(terms["format"], [1, 0, 1])
    # per-term arrays are ungated: the broken row still shows what it would have earned
    np.testing.assert_allclose(terms["ndcg"], [1.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(terms["comp"], [0.5, 0.5, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(terms["sim"], [1, 1, 0])
    np.testing.assert_allclose(terms["ent"], [2, 2, 0], rtol=1e-6)
    np.testing.assert_array_equal(terms["rank"], [1, 1, 3])
    np.testing.assert_array_equal(terms["prob"], [0, 0, 0])
    metrics = rw.reward_metrics(terms)
    assert metrics["reward/format"] == pytest.approx(2 / 3)
    assert metrics["reward/total"] == pytest.approx((r0 + r2) / 3, rel=1e-6)
    # without the gate the broken row earns its raw composite
    total_ng, _ = rw.compute_rewards(rw.RewardConfig(format_gate=False), parsed, scores, **kw)
    np.testing.assert_allclose(total_ng[1], 0.1 + 0.1 * 0.98 + 0.5 + 0.05 + 0.1 + 0.2, rtol=1e-6)


def test_format_gate_zeroes_everything():
    parsed = [parse_output(t) for t in ["no tags at all", "<think>only think</think>", "<answer>a</answer>"]]
    scores = np.array([[9.0, 0.0]] * 3, np.float32)
    kw = dict(summaries=["s"] * 3, cot_emb=np.ones((3, 2)), summary_emb=np.ones((3, 2)),
              entropies=np.ones((3, 4)), cot_mask=np.ones((3, 4), bool))
    for cfg in [rw.RewardConfig(), rw.RewardConfig(mode="r2ec")]:
        total, terms = rw.compute_rewards(cfg, parsed, scores, **kw)
        np.testing.assert_array_equal(total, [0.0, 0.0, 0.0])
        assert terms["ndcg"].min() == 1.0  # the gate, not the terms, made it 0


def test_composite_custom_weights_and_missing_inputs():
    parsed, scores, kw = _inputs()
    cfg = rw.RewardConfig(base=0.0, w_len=0.0, w_ndcg=1.0, w_comp=0.0, w_sim=0.0, w_ent=2.0)
    total, terms = rw.compute_rewards(cfg, parsed, scores, entropies=kw["entropies"], cot_mask=kw["cot_mask"])
    np.testing.assert_allclose(total, [1.0 + 4.0, 0.0, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(terms["comp"], [0, 0, 0])  # weight 0: not computed, reported as 0
    assert cfg.weights() == {"base": 0.0, "len": 0.0, "ndcg": 1.0, "comp": 0.0, "sim": 0.0, "ent": 2.0}
    with pytest.raises(ValueError, match="comp"):
        rw.compute_rewards(rw.RewardConfig(), parsed, scores, **{**kw, "summaries": None})
    with pytest.raises(ValueError):
        rw.compute_rewards(rw.RewardConfig(), parsed, scores[:2], **kw)
    for bad in [dict(mode="x"), dict(ranking="x"), dict(length_scale=0), dict(entropy_quantile=0),
                dict(summary_max_tokens=0)]:
        with pytest.raises(ValueError):
            rw.RewardConfig(**bad)


def _np_ndcg(ranks):
    return 1.0 / np.log2(np.asarray(ranks, np.float64) + 1.0)


def test_r2ec_alternative_matches_numpy_candidates():
    rng = np.random.default_rng(1)
    b, k = 6, 7
    scores = rng.normal(size=(b, 1 + k)).astype(np.float32) * 3
    scores[0, 3] = scores[0, 0]  # a tie
    parsed = [parse_output(GOOD)] * b
    total, terms = rw.compute_rewards(rw.RewardConfig(mode="r2ec"), parsed, scores)
    s = scores.astype(np.float64)
    ranks = 1 + (s[:, 1:] >= s[:, :1]).sum(1)
    p = np.exp(s[:, 0]) / np.exp(s).sum(1)
    np.testing.assert_allclose(total, 0.95 * _np_ndcg(ranks) + 0.05 * p, rtol=1e-5)
    np.testing.assert_allclose(terms["prob"], p, rtol=1e-5)
    assert ranks[0] >= 2


def test_r2ec_alternative_matches_numpy_full_catalogue():
    rng = np.random.default_rng(2)
    b, n = 5, 9
    scores = rng.normal(size=(b, n + 3)).astype(np.float32)  # column 0 padding, 2 extra columns
    scores[:, 0] = 50.0
    scores[:, n + 1:] = 50.0
    targets = rng.integers(1, n + 1, size=b)
    cfg = rw.RewardConfig(mode="r2ec", ranking="full")
    total, terms = rw.compute_rewards(cfg, [parse_output(GOOD)] * b, scores, targets=targets, num_items=n)
    s = scores[:, 1:n + 1].astype(np.float64)
    st = s[np.arange(b), targets - 1]
    ranks = 1 + (s > st[:, None]).sum(1) + ((s == st[:, None]).sum(1) - 1)
    p = np.exp(st) / np.exp(s).sum(1)
    np.testing.assert_allclose(terms["prob"], p, rtol=1e-5)
    np.testing.assert_allclose(total, 0.95 * _np_ndcg(ranks) + 0.05 * p, rtol=1e-5)


def test_target_prob_nan_is_zero():
    p = rw.target_prob(np.array([[np.nan, 0.0, 0.0], [0.0, np.nan, 0.0]], np.float32))
    np.testing.assert_allclose(p, [0.0, 0.5], rtol=1e-6)
