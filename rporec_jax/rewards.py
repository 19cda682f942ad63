"""Stage-2 (GRPO) rewards: each term a pure host-side function over one batch of B completions, and their
weighted composite.

Reference composite (DESIGN.md section 1, Stage 2), the default (`mode='rporec'`):

    R = f * (0.1 + 0.1 R_len + 0.5 R_ndcg + 0.1 R_comp + 0.1 R_sim + 0.1 R_ent)

R2ec-style alternative (`mode='r2ec'`): `R = f * (0.95 R_ndcg + 0.05 p_target)`, p_target = softmax probability
of the target among the ranked items (set `format_gate=False` to drop f there).

Terms (all float32 NumPy `[B]`):
- f       `format_gate`: 1 when the completion has exactly one `<think>..</think>` then `<answer>..</answer>`.
- R_len   `length_reward`: max(0, 1 - (chars before `<think>` + chars after `</answer>`) / length_scale).
- R_ndcg  `ndcg_reward(target_ranks(...))`: 1/log2(rank+1), pessimistic rank of the target by Rechead scores.
- R_comp  `compression_reward`: clip(len(summary)/len(CoT), 0, 1); 0 for an empty CoT.
- R_sim   `similarity_reward`: 1[cos(E_item(CoT), E_item(summary)) > threshold]; 0 when either vector is zero.
- R_ent   `entropy_reward`: mean of the top-q CoT token entropies minus the mean of all CoT token entropies.

The summary is written by a frozen copy of the initial LLM (greedy, <= 128 new tokens) from `summary_prompt`;
`extract_summary` reads it from the continuation only (the prompt itself mentions the tags).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from rporec_jax.data.parser import TAGS, ParsedOutput

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = TAGS
TERMS = ("format", "len", "ndcg", "comp", "sim", "ent", "prob")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Reward weights and switches.

    mode: 'rporec' (reference composite, weights `base`, `w_*`) or 'r2ec' (`r2ec_ndcg` NDCG + `r2ec_prob` prob).
    ranking: 'candidates' (scores [B, 1+K], target in column 0) or 'full' (scores [B, N+1] over the catalogue,
      column 0 = padding, never ranked; targets [B] needed).
    format_gate: multiply the total by f (the reference does, in both modes here).
    length_scale: characters outside the tags that take R_len to 0.
    sim_threshold: cosine above which R_sim = 1 (strictly greater).
    entropy_quantile: q, the top fraction of CoT tokens by entropy (k = ceil(q * n) tokens, at least 1).
    summary_max_tokens: the summariser's new-token limit (for the caller's SamplingConfig; greedy decoding).
    """

    mode: str = "rporec"
    ranking: str = "candidates"
    format_gate: bool = True
    base: float = 0.1
    w_len: float = 0.1
    w_ndcg: float = 0.5
    w_comp: float = 0.1
    w_sim: float = 0.1
    w_ent: float = 0.1
    r2ec_ndcg: float = 0.95
    r2ec_prob: float = 0.05
    length_scale: float = 100.0
    sim_threshold: float = 0.5
    entropy_quantile: float = 0.2
    summary_max_tokens: int = 128

    def __post_init__(self):
        if self.mode not in ("rporec", "r2ec"):
            raise ValueError(f"RewardConfig.mode={self.mode!r}; expected 'rporec' or 'r2ec'")
        if self.ranking not in ("candidates", "full"):
            raise ValueError(f"RewardConfig.ranking={self.ranking!r}; expected 'candidates' or 'full'")
        if not self.length_scale > 0:
            raise ValueError(f"RewardConfig.length_scale={self.length_scale}; must be > 0")
        if not 0 < self.entropy_quantile <= 1:
            raise ValueError(f"RewardConfig.entropy_quantile={self.entropy_quantile}; must be in (0, 1]")
        if self.summary_max_tokens < 1:
            raise ValueError(f"RewardConfig.summary_max_tokens={self.summary_max_tokens}; must be >= 1")

    def weights(self) -> dict[str, float]:
        """Returns {term: weight} of the active mode (the constant `base` under the key 'base')."""
        if self.mode == "r2ec":
            return {"ndcg": self.r2ec_ndcg, "prob": self.r2ec_prob}
        return {"base": self.base, "len": self.w_len, "ndcg": self.w_ndcg, "comp": self.w_comp,
                "sim": self.w_sim, "ent": self.w_ent}


# ------------------------------------------------------------------------------------------------ terms

def format_gate(parsed: Sequence[ParsedOutput]) -> np.ndarray:
    """Returns float32 [B] format flags f in {0, 1} of parsed completions."""
    return np.asarray([float(p.format_ok) for p in parsed], np.float32).reshape(len(parsed))


def length_reward(parsed: Sequence[ParsedOutput], length_scale: float = 100.0) -> np.ndarray:
    """Returns float32 [B] max(0, 1 - (len(pre) + len(post)) / length_scale) (raw characters, whitespace too)."""
    n = np.asarray([len(p.pre) + len(p.post) for p in parsed], np.float64).reshape(len(parsed))
    return np.maximum(0.0, 1.0 - n / length_scale).astype(np.float32)


def target_ranks(scores, targets=None, num_items: Optional[int] = None, ranking: str = "candidates") -> np.ndarray:
    """Returns int32 [B] pessimistic 1-based ranks of each row's target (1 + #higher + #other tied; NaN = -inf).

    ranking='candidates': scores [B, 1+K] with the target in column 0 (every column is a candidate).
    ranking='full': scores [B, M >= N+1] over the catalogue with `targets` [B] in 1..N; column 0 (padding) and
    columns > `num_items` (default M-1) are never ranked. Both use `eval.ranks_from_scores`, so the tie rule is
    exactly the evaluation's.
    """
    from rporec_jax.eval import ranks_from_scores

    scores = np.asarray(scores, np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores have shape {scores.shape}; expected [batch, columns]")
    b, m = scores.shape
    if ranking == "candidates":
        if m < 1:
            raise ValueError("candidate scores have no columns; expected [batch, 1 + K] with the target in column 0")
        # a dummy padding column in front makes the candidates items 1..1+K, the target item 1
        padded = np.concatenate([np.zeros((b, 1), np.float32), scores], axis=1)
        return np.asarray(ranks_from_scores(padded, np.ones((b,), np.int32), m), np.int32)
    if ranking == "full":
        if targets is None:
            raise ValueError("ranking='full' needs targets [batch] (item ids 1..N)")
        targets = np.asarray(targets, np.int32).reshape(-1)
        if targets.shape != (b,):
            raise ValueError(f"targets have shape {targets.shape}; expected ({b},)")
        n = m - 1 if num_items is None else int(num_items)
        if np.any((targets < 1) | (targets > n)):
            raise ValueError(f"targets must be item ids in 1..{n}; got {targets[(targets < 1) | (targets > n)][:5]}")
        return np.asarray(ranks_from_scores(scores, targets, n), np.int32)
    raise ValueError(f"ranking={ranking!r}; expected 'candidates' or 'full'")


def ndcg_reward(ranks) -> np.ndarray:
    """Returns float32 [B] 1/log2(rank + 1) of 1-based ranks [B] (one relevant item, no cut-off)."""
    ranks = np.asarray(ranks, np.float64)
    if np.any(ranks < 1):
        raise ValueError(f"ranks must be >= 1; got {ranks[ranks < 1][:5]}")
    return (1.0 / np.log2(ranks + 1.0)).astype(np.float32)


def target_prob(scores, targets=None, num_items: Optional[int] = None, ranking: str = "candidates") -> np.ndarray:
    """Returns float32 [B] softmax probability of the target among the ranked columns (layouts as `target_ranks`).

    NaN scores count as -inf (probability 0).
    """
    s = np.asarray(scores, np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    b, m = s.shape
    if ranking == "candidates":
        t = np.zeros((b,), np.int64)
        ranked = np.ones((b, m), bool)
    elif ranking == "full":
        if targets is None:
            raise ValueError("ranking='full' needs targets [batch] (item ids 1..N)")
        t = np.asarray(targets, np.int64).reshape(b)
        n = m - 1 if num_items is None else int(num_items)
        col = np.arange(m)
        ranked = np.broadcast_to((col >= 1) & (col <= n), (b, m))
    else:
        raise ValueError(f"ranking={ranking!r}; expected 'candidates' or 'full'")
    s = np.where(ranked, s, -np.inf)
    mx = np.max(s, axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    z = e.sum(axis=1)
    p = e[np.arange(b), t] / np.where(z > 0, z, 1.0)
    return p.astype(np.float32)


def compression_reward(cots: Sequence[str], summaries: Sequence[str]) -> np.ndarray:
    """Returns float32 [B] clip(len(summary) / len(cot), 0, 1) in characters; 0 where the CoT is empty."""
    if len(cots) != len(summaries):
        raise ValueError(f"{len(cots)} CoTs but {len(summaries)} summaries")
    return np.asarray([min(len(s) / len(c), 1.0) if c else 0.0 for c, s in zip(cots, summaries)],
                      np.float32).reshape(len(cots))


def similarity_reward(cot_emb, summary_emb, threshold: float = 0.5) -> np.ndarray:
    """Returns float32 [B] 1[cos(cot_emb, summary_emb) > threshold] of two [B, d] arrays; 0 where a row is zero."""
    a, b = np.asarray(cot_emb, np.float64), np.asarray(summary_emb, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embedding shapes {a.shape} and {b.shape}; expected two equal [batch, dim] arrays")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0) & np.isfinite(na) & np.isfinite(nb)
    cos = np.where(ok, np.sum(a * b, axis=1) / np.where(ok, na * nb, 1.0), 0.0)
    return (ok & (cos > threshold)).astype(np.float32)


def entropy_reward(entropies, cot_mask, quantile: float = 0.2) -> np.ndarray:
    """Returns float32 [B] mean of the k = max(1, ceil(q * n)) highest CoT-token entropies minus the mean of all
    n CoT-token entropies, from entropies [B, N] and a CoT-token mask [B, N]; 0 for rows with n = 0."""
    e = np.asarray(entropies, np.float64)
    m = np.asarray(cot_mask, bool)
    if e.ndim != 2 or e.shape != m.shape:
        raise ValueError(f"entropies {e.shape} and cot_mask {m.shape}; expected two equal [batch, tokens] arrays")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile={quantile}; must be in (0, 1]")
    n = m.sum(axis=1)
    srt = -np.sort(np.where(m, -e, np.inf), axis=1)  # descending, masked tokens (-inf) last
    k = np.maximum(1, np.ceil(quantile * n - 1e-9)).astype(np.int64)  # 0.28 * 25 = 7.000000000000001 -> 7
    top_k = np.arange(e.shape[1])[None, :] < k[:, None]
    top = np.sum(np.where(top_k, srt, 0.0), axis=1) / k
    mean = np.sum(np.where(m, e, 0.0), axis=1) / np.maximum(n, 1)
    return np.where(n > 0, top - mean, 0.0).astype(np.float32)


# -------------------------------------------------------------------------------------- CoT token mask

def cot_char_span(text: str, assume_think_open: bool = False) -> tuple[int, int]:
    """Returns [start, end) character offsets in `text` of the CoT as `parse_output` reads it (stripped).

    Same rules as the parser: first `<think>` to the first `</think>` after it; from the start of the text
    when only `</think>` is present; to the end when `<think>` is never closed; (0, 0) when neither tag occurs.
    `assume_think_open`: the text is read as if it began with `<think>` (offsets stay those of `text`).
    """
    shift = len(THINK_OPEN) if assume_think_open else 0
    full = THINK_OPEN + text if assume_think_open else text
    open_i = full.find(THINK_OPEN)
    close_i = full.find(THINK_CLOSE, open_i + len(THINK_OPEN) if open_i >= 0 else 0)
    if close_i >= 0:
        start, end = (open_i + len(THINK_OPEN), close_i) if 0 <= open_i < close_i else (0, close_i)
    elif open_i >= 0:
        start, end = open_i + len(THINK_OPEN), len(full)
    else:
        return 0, 0
    while start < end and full[start].isspace():
        start += 1
    while end > start and full[end - 1].isspace():
        end -= 1
    if start == end:
        return 0, 0
    return max(start - shift, 0), max(end - shift, 0)


def prefix_lengths(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> tuple[np.ndarray, str]:
    """Returns (int64 [n+1] character length of decode(ids[:t]) for t = 0..n, the full decoded text).

    Decoding prefixes is O(n) decodes but exact for any tokenizer whose decoding is prefix-stable; where it is
    not (a partial UTF-8 byte decodes to U+FFFD, or a decoder cleans up spaces) the lengths are forced
    non-decreasing and capped at the full text's length, so each token gets the span its text grew by.
    """
    ids = [int(t) for t in token_ids]
    full = decode(ids)
    lens = np.zeros(len(ids) + 1, np.int64)
    for t in range(1, len(ids) + 1):
        lens[t] = min(max(len(decode(ids[:t])), lens[t - 1]), len(full))
    lens[len(ids)] = len(full)
    return lens, full


def cot_token_mask(tokens, mask, decode: Any, assume_think_open: bool = False,
                   prefix_lens: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """Returns bool [B, N]: True on the completion tokens whose decoded text overlaps the CoT span.

    tokens [B, N] completion ids, mask [B, N] True on real completion tokens (a row's real tokens come first,
    as the sampler returns them). `decode` is a tokenizer (its `.decode`) or a callable ids -> str. Approach:
    decode every prefix of the row's tokens to get each token's character span [len(prefix_t),
    len(prefix_{t+1})), find the (stripped) CoT span of the decoded text with `cot_char_span`, and mark the
    tokens that overlap it; the tag tokens themselves and surrounding whitespace tokens are not marked.
    `prefix_lens` [B][n_b + 1] (e.g. from tokenizer offsets) skips the prefix decoding; the text is then
    decoded once per row.
    """
    dec = decode.decode if hasattr(decode, "decode") else decode
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and mask {mask.shape}; expected two equal [batch, tokens] arrays")
    out = np.zeros(mask.shape, bool)
    for r in range(tokens.shape[0]):
        n = int(mask[r].sum())
        if n and not mask[r, :n].all():
            raise ValueError(f"row {r}: mask is not a prefix of the row (real completion tokens must come first)")
        ids = tokens[r, :n]
        if prefix_lens is not None:
            lens, text = np.asarray(prefix_lens[r], np.int64), dec([int(t) for t in ids])
            if lens.shape != (n + 1,):
                raise ValueError(f"row {r}: prefix_lens has {lens.shape[0]} entries; expected n + 1 = {n + 1}")
        else:
            lens, text = prefix_lengths(ids, dec)
        start, end = cot_char_span(text, assume_think_open)
        if end > start:
            out[r, :n] = (lens[:-1] < end) & (lens[1:] > start)
    return out


# ------------------------------------------------------------------------------------------ summaries

SUMMARY_SYSTEM = "You are a helpful assistant."
SUMMARY_INSTRUCTION = (
    "Summarise the following reasoning about a user's preferences in a few sentences, keeping its key "
    "conclusions. Write only the summary, inside <answer></answer>.\n\nReasoning:\n"
)


def summary_prompt(cot: str, system: str = SUMMARY_SYSTEM, system_role: str = "system") -> list[dict]:
    """Returns the chat messages [system, user] asking the summariser to summarise `cot` inside <answer> tags."""
    return [{"role": system_role, "content": system}, {"role": "user", "content": SUMMARY_INSTRUCTION + cot}]


def extract_summary(continuation: str, prompt_text: Optional[str] = None) -> str:
    """Returns the stripped text of the first complete `<answer>...</answer>` in the continuation, or ''.

    Pass only the generated continuation (the prompt mentions the tags). If the text given is prompt +
    continuation, pass `prompt_text` and it is cut off first (an error when the text does not start with it).
    "First complete": the first `</answer>` that follows an `<answer>`, paired with the last `<answer>` before
    it (so `<answer> a <answer> b </answer>` gives 'b'; `</answer>` with no opening tag before it is skipped).
    """
    text = continuation
    if prompt_text is not None:
        if not text.startswith(prompt_text):
            raise ValueError("extract_summary: the text does not start with prompt_text")
        text = text[len(prompt_text):]
    open_i = text.find(ANSWER_OPEN)
    if open_i < 0:
        return ""
    close_i = text.find(ANSWER_CLOSE, open_i + len(ANSWER_OPEN))
    if close_i < 0:
        return ""
    start = text.rfind(ANSWER_OPEN, open_i, close_i) + len(ANSWER_OPEN)
    return text[start:close_i].strip()


def generate_summaries(sampler, cots: Sequence[str], key, params: Any = None, system_role: str = "system") -> list[str]:
    """Returns one summary per CoT ('' for an empty CoT, no generation for it) from a greedy `sampler`.

    `sampler` is a `sampling.Sampler` over the frozen initial model with temperature 0 and max_new_tokens <=
    RewardConfig.summary_max_tokens; `params` overrides its parameters (e.g. the frozen reference copy).
    """
    cfg = getattr(sampler, "config", None)
    if cfg is not None and (cfg.temperature != 0 or cfg.num_samples != 1):
        raise ValueError(f"the summariser must decode greedily, one sample: temperature={cfg.temperature}, "
                         f"num_samples={cfg.num_samples}")
    out = [""] * len(cots)
    rows = [i for i, c in enumerate(cots) if c]
    if rows:
        res = sampler.generate([summary_prompt(cots[i], system_role=system_role) for i in rows], key, params)
        for i, text in zip(rows, res.texts):
            out[i] = extract_summary(text)
    return out


def embed_texts(encoder, texts: Sequence[str], max_len: Optional[int] = 256) -> np.ndarray:
    """Returns float32 [B, d] E_item vectors of `texts` (`text_encoder.encode_texts`); zero rows for ''."""
    from rporec_jax.models.text_encoder import encode_texts

    out = np.zeros((len(texts), encoder.dim), np.float32)
    rows = [i for i, t in enumerate(texts) if t]
    if rows:
        out[rows] = encode_texts(encoder, [texts[i] for i in rows], max_len=max_len, progress=False)
    return out


# ------------------------------------------------------------------------------------------ composite

def compute_rewards(cfg: RewardConfig, parsed: Sequence[ParsedOutput], scores, targets=None,
                    num_items: Optional[int] = None, summaries: Optional[Sequence[str]] = None,
                    cot_emb=None, summary_emb=None, entropies=None, cot_mask=None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Returns (float32 [B] totals, {term: float32 [B]}) for B parsed completions.

    scores: [B, 1+K] (ranking='candidates', target in column 0) or [B, N+1] with `targets` [B] ('full').
    summaries [B] (R_comp), cot_emb/summary_emb [B, d] (R_sim), entropies/cot_mask [B, N] (R_ent) are needed
    only when their term has a non-zero weight in the active mode; unused terms are reported as zeros.
    The per-term arrays are ungated (what the completion would earn with f = 1); 'format' holds f, 'rank' the
    target ranks and 'total' the totals.
    """
    b = len(parsed)
    w = cfg.weights()
    f = format_gate(parsed)
    ranks = target_ranks(scores, targets, num_items, cfg.ranking)
    if ranks.shape != (b,):
        raise ValueError(f"scores have {ranks.shape[0]} rows; expected one per completion ({b})")
    zeros = np.zeros((b,), np.float32)
    terms = {"format": f, "ndcg": ndcg_reward(ranks), "len": zeros, "comp": zeros, "sim": zeros, "ent": zeros,
             "prob": zeros}

    def need(name, *inputs):
        if w.get(name, 0.0) == 0.0:
            return False
        if any(x is None for x in inputs):
            raise ValueError(f"reward term {name!r} has weight {w[name]} but its inputs were not given")
        return True

    if need("len"):
        terms["len"] = length_reward(parsed, cfg.length_scale)
    if need("comp", summaries):
        terms["comp"] = compression_reward([p.cot for p in parsed], summaries)
    if need("sim", cot_emb, summary_emb):
        terms["sim"] = similarity_reward(cot_emb, summary_emb, cfg.sim_threshold)
    if need("ent", entropies, cot_mask):
        terms["ent"] = entropy_reward(entropies, cot_mask, cfg.entropy_quantile)
    if need("prob"):
        terms["prob"] = target_prob(scores, targets, num_items, cfg.ranking)
    for name, arr in terms.items():
        if arr.shape != (b,):
            raise ValueError(f"reward term {name!r} has shape {arr.shape}; expected ({b},)")
    raw = np.full((b,), w.get("base", 0.0), np.float64)
    for name, weight in w.items():
        if name != "base":
            raw += weight * terms[name].astype(np.float64)
    total = (f * raw if cfg.format_gate else raw).astype(np.float32)
    terms["rank"] = ranks
    terms["total"] = total
    return total, terms


def reward_metrics(terms: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Returns {'reward/<term>': mean} of `compute_rewards`' per-term arrays (format mean = format rate)."""
    return {f"reward/{k}": float(np.mean(v)) if np.size(v) else 0.0 for k, v in terms.items()}
