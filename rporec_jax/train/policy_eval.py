"""Evaluation of a (tuned) policy: it writes its own reasoning for each instance, the Rechead ranks the whole
catalogue from it, and full-ranking metrics are reported with the format rate and completion length."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh

from rporec_jax.sampling import ForceFormat, Sampler, SamplingConfig
from rporec_jax.train.cot import completion_record


def policy_completions(sampler: Sampler, params, ds, split: str, limit: Optional[int] = None, batch_size: int = 8,
                       seed: int = 0, assume_think_open: bool = False, progress: bool = True,
                       should_stop: Optional[Callable[[], bool]] = None, partial_file: Optional[str] = None,
                       partial_tag: str = "") -> dict[int, list[dict]]:
    """Returns {instance index: [completion record]} of `sampler` (with `params`) on the first `limit` instances
    of `split`, one completion each (records as `rporec_jax.train.cot.completion_record`).

    `should_stop()` is polled before every batch: when it returns True, `Stopped` is raised. With `partial_file`,
    every finished batch is appended to it (process 0), and a later call with the same settings (and the same
    `partial_tag`, which names the policy) reads them back instead of generating them again: each batch's key
    depends only on its position, so the result equals an uninterrupted call's."""
    from tqdm.auto import tqdm

    from rporec_jax.train.resume import Stopped, fingerprint

    builder = ds.prompt_builder(sampler.model.tokenizer)
    recs = list(itertools.islice(ds.records(split), limit))
    prompts = [ids for ids, _ in builder.encode([[h for h in r["history"] if h] for r in recs])]
    order = sorted(range(len(recs)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    fp = fingerprint(sampler.config, split, limit, batch_size, seed, assume_think_open, partial_tag, len(recs))
    saved = _read_partial(partial_file, fp) if partial_file else {}
    if partial_file and jax.process_index() == 0 and not saved:
        os.makedirs(os.path.dirname(os.path.abspath(partial_file)), exist_ok=True)
        with open(partial_file, "w") as f:
            f.write(json.dumps({"fingerprint": fp}) + "\n")
    out: dict[int, list[dict]] = {}
    n_batches = -(-len(order) // batch_size)
    for b, start in enumerate(tqdm(range(0, len(order), batch_size), desc=f"policy {split}", unit="batch",
                                   disable=not progress, dynamic_ncols=True)):
        if b in saved:
            out.update(saved[b])
            continue
        if should_stop is not None and should_stop():
            raise Stopped(f"eval (policy on {split}) at batch {b + 1} of {n_batches}")
        idx = order[start:start + batch_size]
        batch = [prompts[i] for i in idx]
        batch += [batch[-1]] * (batch_size - len(batch))  # one compiled shape per bucket
        res = sampler.generate(batch, jax.random.fold_in(jax.random.key(seed), b), params)
        g = sampler.config.num_samples
        new = {}
        for j, i in enumerate(idx):
            r = j * g
            new[recs[i]["index"]] = [completion_record(recs[i]["index"], 0, res.texts[r], res.lengths[r],
                                                       res.stopped[r], len(prompts[i]), assume_think_open)]
        out.update(new)
        if partial_file and jax.process_index() == 0:
            with open(partial_file, "a") as f:  # one write per batch: a kill loses at most this line
                f.write(json.dumps({"batch": b, "records": [[i, v] for i, v in new.items()]}) + "\n")
    return out


def _read_partial(path: str, fp: str) -> dict[int, dict]:
    """Returns {batch: {instance index: records}} saved in `path` under fingerprint `fp` ({} when there is no such
    file, or it was written under other settings); a line cut short by a kill is ignored."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return {}
    out = {}
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if k == 0 and row.get("fingerprint") != fp:
            return {}
        if k > 0:
            out[int(row["batch"])] = {int(i): v for i, v in row["records"]}
    return out


def evaluate_policy(model, params, ds, split: str, head, state, encoder=None, decoding: str = "greedy",
                    max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                    prompt_buckets=(256, 512, 1024, 2048), limit: Optional[int] = None, batch_size: int = 8,
                    seed: int = 0, assume_think_open: bool = False, mesh: Optional[Mesh] = None, strategy="dp",
                    eval_config=None, sampler: Optional[Sampler] = None, progress: bool = True,
                    should_stop: Optional[Callable[[], bool]] = None, partial_file: Optional[str] = None,
                    partial_tag: str = "", force_format: ForceFormat = ForceFormat()) -> tuple[dict, dict]:
    """Returns (metrics, completions): full-ranking metrics of the Rechead in `state` reading the policy's own
    reasoning ('greedy' or 'sampled' decoding), plus `format_rate`, `completion_length` and the per-instance
    'ranks' and 'index' (`rporec_jax.eval.evaluate(keep_ranks)`).

    The hidden_state Rechead reads the frozen reference (`state.params['reference']`, else `model.params`).
    `should_stop`, `partial_file`, `partial_tag`: see `policy_completions` (a stop raises `Stopped` between
    generation batches). `force_format` (budget forcing, as in `Stage2Config.force_format`) applies to the
    sampler built here when none is given."""
    from rporec_jax.train.features import rechead_examples
    from rporec_jax.train.hidden_features import hidden_examples
    from rporec_jax.train.stage1 import evaluate_rechead

    if decoding not in ("greedy", "sampled"):
        raise ValueError(f"decoding={decoding!r}; expected 'greedy' or 'sampled'")
    if sampler is None:
        sampler = Sampler(model, SamplingConfig(max_new_tokens=max_new_tokens, prompt_buckets=tuple(prompt_buckets),
                                                temperature=0.0 if decoding == "greedy" else temperature,
                                                top_p=top_p, force=force_format))
    cot = policy_completions(sampler, params, ds, split, limit, batch_size, seed, assume_think_open, progress,
                             should_stop=should_stop, partial_file=partial_file, partial_tag=partial_tag)
    if head.variant == "hidden_state":
        frozen = dataclasses.replace(model, params=state.params.get("reference", model.params))
        examples = hidden_examples(ds, split, frozen, cot, limit)
    else:
        examples = rechead_examples(ds, split, encoder, cot if head.variant == "text_fusion" else None, limit=limit)
    metrics = evaluate_rechead(state, head, examples, ds.num_items, mesh, strategy, eval_config, keep_ranks=True)
    recs = [r[0] for r in cot.values()]
    metrics["format_rate"] = float(np.mean([r["format_ok"] for r in recs])) if recs else 0.0
    metrics["completion_length"] = float(np.mean([r["num_tokens"] for r in recs])) if recs else 0.0
    return metrics, cot
