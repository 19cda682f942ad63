"""Evaluation of a (tuned) policy: it writes its own reasoning for each instance, the Rechead ranks the whole
catalogue from it, and full-ranking metrics are reported with the format rate and completion length."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh

from rporec_jax.sampling import Sampler, SamplingConfig
from rporec_jax.train.cot import completion_record


def policy_completions(sampler: Sampler, params, ds, split: str, limit: Optional[int] = None, batch_size: int = 8,
                       seed: int = 0, assume_think_open: bool = False, progress: bool = True) -> dict[int, list[dict]]:
    """Returns {instance index: [completion record]} of `sampler` (with `params`) on the first `limit` instances
    of `split`, one completion each (records as `rporec_jax.train.cot.completion_record`)."""
    from tqdm.auto import tqdm

    builder = ds.prompt_builder(sampler.model.tokenizer)
    recs = list(itertools.islice(ds.records(split), limit))
    prompts = [ids for ids, _ in builder.encode([[h for h in r["history"] if h] for r in recs])]
    order = sorted(range(len(recs)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: dict[int, list[dict]] = {}
    for b, start in enumerate(tqdm(range(0, len(order), batch_size), desc=f"policy {split}", unit="batch",
                                   disable=not progress, dynamic_ncols=True)):
        idx = order[start:start + batch_size]
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))  # one compiled shape per bucket
        res = sampler.generate(batch, jax.random.fold_in(jax.random.key(seed), b), params)
        g = sampler.config.num_samples
        for j, i in enumerate(idx):
            r = j * g
            out[recs[i]["index"]] = [completion_record(recs[i]["index"], 0, res.texts[r], res.lengths[r],
                                                       res.stopped[r], len(prompts[i]), assume_think_open)]
    return out


def evaluate_policy(model, params, ds, split: str, head, state, encoder=None, decoding: str = "greedy",
                    max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                    prompt_buckets=(256, 512, 1024, 2048), limit: Optional[int] = None, batch_size: int = 8,
                    seed: int = 0, assume_think_open: bool = False, mesh: Optional[Mesh] = None, strategy="dp",
                    eval_config=None, sampler: Optional[Sampler] = None, progress: bool = True) -> tuple[dict, dict]:
    """Returns (metrics, completions): full-ranking metrics of the Rechead in `state` reading the policy's own
    reasoning ('greedy' or 'sampled' decoding), plus `format_rate` and `completion_length`.

    The hidden_state Rechead reads the frozen reference (`state.params['reference']`, else `model.params`)."""
    from rporec_jax.train.features import rechead_examples
    from rporec_jax.train.hidden_features import hidden_examples
    from rporec_jax.train.stage1 import evaluate_rechead

    if decoding not in ("greedy", "sampled"):
        raise ValueError(f"decoding={decoding!r}; expected 'greedy' or 'sampled'")
    if sampler is None:
        sampler = Sampler(model, SamplingConfig(max_new_tokens=max_new_tokens, prompt_buckets=tuple(prompt_buckets),
                                                temperature=0.0 if decoding == "greedy" else temperature,
                                                top_p=top_p))
    cot = policy_completions(sampler, params, ds, split, limit, batch_size, seed, assume_think_open, progress)
    if head.variant == "hidden_state":
        frozen = dataclasses.replace(model, params=state.params.get("reference", model.params))
        examples = hidden_examples(ds, split, frozen, cot, limit)
    else:
        examples = rechead_examples(ds, split, encoder, cot if head.variant == "text_fusion" else None, limit=limit)
    metrics = evaluate_rechead(state, head, examples, ds.num_items, mesh, strategy, eval_config)
    recs = [r[0] for r in cot.values()]
    metrics["format_rate"] = float(np.mean([r["format_ok"] for r in recs])) if recs else 0.0
    metrics["completion_length"] = float(np.mean([r["num_tokens"] for r in recs])) if recs else 0.0
    return metrics, cot
