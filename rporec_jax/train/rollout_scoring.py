"""Reward of GRPO rollouts: parse each completion, score it with the frozen Rechead, add the other terms.

The Rechead reads the completion the way stage 1 trained it to (text variants: prompt/CoT/answer through the
towers; `hidden_state`: the frozen reference LLM's state at the end of prompt + completion) and ranks the
instance's candidates (target + its negatives) or, with RewardConfig.ranking='full', the whole catalogue.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from rporec_jax import sharding as shd
from rporec_jax.data.parser import parse_output
from rporec_jax.rewards import RewardConfig, compute_rewards, cot_token_mask, embed_texts, generate_summaries, \
    reward_metrics
from rporec_jax.sampling import Sampler, SamplingConfig
from rporec_jax.train.features import DEFAULT_MAX_LENS


@dataclasses.dataclass
class Scored:
    """rewards [R]; terms {name: [R]}; metrics {'reward/<term>': mean, ...}; examples: the Rechead inputs of
    the rows (stage-1 batch layout, for a Rechead refresh; None for the hidden_state variant)."""

    rewards: np.ndarray
    terms: dict
    metrics: dict
    examples: Optional[dict]


def _pad_rows(batch: dict, multiple: int) -> tuple[dict, int]:
    """Returns (batch padded with copies of row 0 to a multiple of `multiple` rows, real row count)."""
    n = len(next(iter(batch.values())))
    extra = -n % multiple
    if not extra:
        return batch, n
    return {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in batch.items()}, n


@functools.partial(jax.jit, static_argnums=0)
def _last_hidden(module, params, tokens, mask):
    """Returns the final hidden state `[B, E]` at the last position of left-padded `tokens` `[B, S]`."""
    return module.apply({"params": params}, tokens, None, mask, None, False).hidden[:, -1]


class RolloutScorer:
    """Computes rewards of rollouts with the frozen Rechead and reference model held in a TrainState's params."""

    def __init__(self, model, head, encoder, num_items: int, cfg: RewardConfig, mesh: Optional[Mesh] = None,
                 assume_think_open: bool = False, max_lens: dict = DEFAULT_MAX_LENS):
        from rporec_jax.train.stage1 import _eval_fns

        self.model, self.head, self.encoder, self.num_items, self.cfg = model, head, encoder, num_items, cfg
        self.mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
        self.multiple = int(np.prod([self.mesh.shape[a] for a in shd.BATCH_AXES]))
        self.assume_think_open, self.max_lens = assume_think_open, max_lens
        self.users, self.items = _eval_fns(head)
        w = cfg.weights()
        self.needs_summary = w.get("comp", 0) != 0 or w.get("sim", 0) != 0
        self.needs_cot_mask = w.get("ent", 0) != 0
        if self.needs_summary:
            self.summariser = Sampler(model, SamplingConfig(max_new_tokens=cfg.summary_max_tokens, temperature=0.0,
                                                            prompt_buckets=(256, 512, 1024, 2048)))

    def rechead_inputs(self, prompt_texts: Sequence[str], prompt_ids: Sequence[Sequence[int]], out, parsed,
                       params: dict) -> dict:
        """Returns the Rechead's user-side inputs for R rows (the layout `rechead_examples` gives stage 1)."""
        if self.head.variant == "hidden_state":
            lists = [list(p) + out.tokens[r, :out.lengths[r]].tolist() for r, p in enumerate(prompt_ids)]
            return {"hidden": self._hidden_states(lists, params["reference"])}
        batch = {}
        texts = {"prompt": list(prompt_texts), "cot": [p.cot for p in parsed], "answer": [p.answer for p in parsed]}
        for name, t in texts.items():
            batch[f"{name}_ids"], batch[f"{name}_mask"] = self.encoder.tokenize(t, max_len=self.max_lens[name])
        batch["format"] = np.asarray([p.format_ok for p in parsed], np.int32)
        return batch

    def _hidden_states(self, lists, params) -> np.ndarray:
        buckets = (64, 128, 256, 512, 1024, 2048, 4096)
        longest = max(len(x) for x in lists)
        width = next((b for b in buckets if b >= longest), longest)
        rows = -(-len(lists) // self.multiple) * self.multiple
        tokens = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), bool)
        mask[:, -1] = True
        for r, seq in enumerate(lists):
            tokens[r, width - len(seq):] = seq
            mask[r, width - len(seq):] = True
        return np.asarray(_last_hidden(self.model.module, params, tokens, mask), np.float32)[:len(lists)]

    def scores(self, params: dict, inputs: dict, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        """Returns Rechead scores: `[R, 1 + K]` (target first, then its negatives) or `[R, N + 1]` ('full')."""
        padded, n = _pad_rows(inputs, self.multiple)
        u = np.asarray(jax.device_get(self.users(params, padded)), np.float32)[:n]  # [R, d]
        items = np.asarray(jax.device_get(self.items(params)), np.float32)[:self.num_items + 1]  # [N + 1, d]
        if self.cfg.ranking == "full":
            return u @ items.T
        cand = np.concatenate([targets[:, None], negatives], axis=1)  # [R, 1 + K]
        return np.einsum("rd,rkd->rk", u, items[cand])

    def score(self, params: dict, prompt_texts: Sequence[str], prompt_ids: Sequence[Sequence[int]], out,
              records: Sequence[dict]) -> Scored:
        """Returns the rewards of a rollout `out` (R rows) whose row r answers `records[r]`."""
        cfg = self.cfg
        parsed = [parse_output(t, self.assume_think_open) for t in out.texts]
        targets = np.asarray([r["target"] for r in records], np.int32)
        negatives = np.asarray([r.get("negatives", []) for r in records], np.int32).reshape(len(records), -1)
        inputs = self.rechead_inputs(prompt_texts, prompt_ids, out, parsed, params)
        scores = self.scores(params, inputs, targets, negatives)
        summaries = cot_emb = summary_emb = cot_mask = None
        if self.needs_summary:
            cots = [p.cot for p in parsed]
            summaries = generate_summaries(self.summariser, cots, jax.random.key(0), params["reference"])
            cot_emb, summary_emb = embed_texts(self.encoder, cots), embed_texts(self.encoder, summaries)
        if self.needs_cot_mask:
            cot_mask = cot_token_mask(out.tokens, out.mask, self.model.tokenizer, self.assume_think_open)
        rewards, terms = compute_rewards(cfg, parsed, scores, targets, self.num_items, summaries, cot_emb,
                                         summary_emb, out.entropies, cot_mask)
        examples = None
        if self.head.variant != "hidden_state":
            examples = {**inputs, "target": targets, "negatives": negatives}
        return Scored(rewards, terms, reward_metrics(terms), examples)
