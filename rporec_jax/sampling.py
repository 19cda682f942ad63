"""KV-cache sampler: left-padded prefill, then one jitted `lax.while_loop` decoding every row until it stops.

Used for stage-1 CoT generation, GRPO rollouts (G samples per prompt), the reward's summariser and
evaluation. Prompts are left-padded to a length bucket and the batch to a multiple of the mesh's batch
size, so a long run compiles a bounded number of programs (counted in `Sampler.compilations`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rporec_jax import sharding as shd
from rporec_jax.models.decoder import Decoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ForceFormat:
    """Budget forcing of the `<think> CoT </think>\\n<answer> answer </answer>` format (off by default).

    For backbones that never write the tags themselves (SmolLM2-135M): `<think>` is appended to every prompt,
    so the completion starts inside the think block (parse it with `assume_think_open`); after `think_tokens`
    sampled tokens, or in place of a stop token sampled earlier, the sampler writes `</think>\\n<answer>`; after
    `answer_tokens` sampled answer tokens, or in place of an earlier stop token, it writes `</answer>` and a stop
    id. The model cannot finish a tag by sampling (the tokens completing the tokenizer's own spelling of a tag
    are masked) nor start a block with a stop id, so both blocks are non-empty and the format holds unless the
    model spells a tag with other tokens (the format flag then says so).
    """

    enabled: bool = False
    think_tokens: int = 256
    answer_tokens: int = 64

    def __post_init__(self):
        if self.think_tokens < 1 or self.answer_tokens < 1:
            raise ValueError(f"ForceFormat: think_tokens={self.think_tokens}, answer_tokens={self.answer_tokens}; "
                             "both must be >= 1")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters; `force` = budget
    forcing of the answer format (`ForceFormat`)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    stop_strings: tuple[str, ...] = ()
    return_entropies: bool = False
    cache_dtype: Optional[str] = None  # default: the model's compute dtype
    force: ForceFormat = ForceFormat()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.num_samples < 1:
            raise ValueError(f"invalid sampling settings: temperature={self.temperature} (>= 0), "
                             f"top_p={self.top_p} (in (0, 1]), top_k={self.top_k} (>= 0), "
                             f"num_samples={self.num_samples} (>= 1)")
        if list(self.prompt_buckets) != sorted(self.prompt_buckets) or not self.prompt_buckets:
            raise ValueError(f"prompt_buckets={self.prompt_buckets} must be a non-empty ascending sequence")


@dataclasses.dataclass
class SampleOutput:
    """Host results for R = prompts * num_samples rows, prompt-major (row r is prompt r // G, sample r % G).

    prompt_tokens [R, P] left-padded, prompt_mask [R, P], prompt_lengths [R];
    tokens [R, N] completion ids (pad after the end), mask [R, N] True on completion tokens (the stop token
    included), logprobs [R, N] of the sampled tokens under logits / temperature (0 where masked),
    entropies [R, N] or None, lengths [R], texts (completion text without the stop token), stopped [R] True
    when a stop id or stop string ended the row, forced [R, N] True on the tokens budget forcing wrote (not
    sampled: their log-probs and entropies are 0; all False when forcing is off). With forcing, prompt_tokens
    end with the prefilled `<think>`.
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    prompt_lengths: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    entropies: Optional[np.ndarray]
    lengths: np.ndarray
    texts: list[str]
    stopped: np.ndarray
    forced: np.ndarray


class ForcedTokens(NamedTuple):
    """Budget forcing's tokens for one tokenizer (constants of the jitted loop): `think_open` is appended to
    every prompt, `close_think` (`</think>\\n<answer>`) ends the think block, `close_answer` (`</answer>` + a stop
    id) ends the completion. Tags come only from the forcing: while a row's last tokens equal `tag_prefixes[i]`
    (the first tokens of a tag as the tokenizer writes it, possibly none), the tokens of `tag_bans[i]` (bool
    `[rules, vocab]`: those whose text completes the tag) are not sampled."""

    think_open: tuple[int, ...]
    close_think: tuple[int, ...]
    close_answer: tuple[int, ...]
    tag_prefixes: tuple[tuple[int, ...], ...]
    tag_bans: np.ndarray


# the nucleus is first looked for among this many largest logits (a partial sort); only when some row's nucleus
# is wider does the whole vocabulary get searched
TOP_P_CANDIDATES = 256


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Returns logits `[rows, vocab]` with tokens outside the top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p` (a token is kept if the
    mass strictly before it is < top_p, so the most likely token always stays; ties at the edge are all kept).
    Exact without sorting the vocabulary, which cost more than the model's decode step at batch 64 on CPU.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        logits = jnp.where(_nucleus(logits, top_p), logits, -jnp.inf)
    return logits


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """Returns the top-p nucleus `[rows, vocab]` bool of float32 logits `[rows, vocab]`."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    # the candidates, sorted: exact when a row's nucleus ends among them (its candidates' mass reaches top_p)
    top = jax.lax.top_k(logits, min(TOP_P_CANDIDATES, logits.shape[-1]))[0]
    probs = jnp.exp(top - lse)
    mass = jnp.cumsum(probs, axis=-1)
    threshold = jnp.min(jnp.where(mass - probs < top_p, top, jnp.inf), axis=-1, keepdims=True)
    fits = mass[..., -1:] >= top_p

    def whole_vocabulary():
        return jnp.where(fits, logits >= threshold, _nucleus_by_bisection(jnp.exp(logits - lse), top_p))

    return jax.lax.cond(jnp.all(fits), lambda: logits >= threshold, whole_vocabulary)


def _nucleus_by_bisection(probs: jax.Array, top_p: float) -> jax.Array:
    """Returns `probs >= t` `[rows, vocab]` for the largest t whose upper set `probs >= t` holds mass >= top_p.

    Non-negative float32 values order like their int32 bit patterns, so 32 halvings of the bit range find t
    exactly, each a masked sum over the vocabulary (~6x cheaper than one sort on XLA:CPU).
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    lo = jnp.zeros(bits.shape[:-1] + (1,), jnp.int32)  # invariant: mass(probs >= lo) >= top_p
    hi = jnp.max(bits, axis=-1, keepdims=True) + 1  # invariant: mass(probs >= hi) == 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return bits >= lo


def _token_stats(logits: jax.Array, tokens: jax.Array, temperature: float, entropies: bool):
    """Returns (log p(tokens) under logits/T, entropy of softmax(logits/T) or None); float32 `[rows]`."""
    scaled = logits.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1) if entropies else None
    return chosen, ent


def _choose(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Returns the next token `[rows]` (greedy when temperature is 0)."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits.astype(jnp.float32) / cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


# Budget forcing's per-row phases: sampling the CoT, writing `</think>\n<answer>`, sampling the answer, writing
# `</answer>` + stop id.
THINK, CLOSE_THINK, ANSWER, CLOSE_ANSWER = 0, 1, 2, 3


def _ban(logits: jax.Array, count: jax.Array, recent: jax.Array, forcing: ForcedTokens,
         stop_ids: jax.Array) -> jax.Array:
    """Returns logits `[rows, vocab]` at -inf where a token would complete a tag after the row's `recent` tokens
    `[rows, w]` (tags come only from the forcing), and at the stop ids in rows whose block has no sampled token
    yet (`count` `[rows]` == 0: blocks are non-empty)."""
    w = recent.shape[1]
    hits = jnp.stack([jnp.all(recent[:, w - len(p):] == jnp.asarray(p, jnp.int32).reshape(1, -1), axis=1)
                      for p in forcing.tag_prefixes], axis=1)  # [rows, rules]
    # a matmul, not a [rows, rules, vocab] broadcast: that would be ~100 MB a step for a 150k vocabulary
    banned = jnp.dot(hits.astype(jnp.float32), jnp.asarray(forcing.tag_bans, jnp.float32)) > 0
    neg = jnp.asarray(-jnp.inf, logits.dtype)
    logits = jnp.where(banned, neg, logits)
    first = (count == 0)[:, None]
    return logits.at[:, stop_ids].set(jnp.where(first, neg, logits[:, stop_ids]))


def _force(sampled: jax.Array, is_stop: jax.Array, phase: jax.Array, count: jax.Array, pos: jax.Array,
           forcing: ForcedTokens, budget: ForceFormat):
    """Returns (token, forced, phase, count, pos), each `[rows]`, after one decode step of budget forcing.

    `sampled` / `is_stop`: the token drawn this step and whether it is a stop id; `count`: tokens sampled in the
    current block; `pos`: the next index into the forced queue `close_think + close_answer`. A block that has
    spent its budget, or drew a stop id (which is dropped), starts its closing sequence at this very step."""
    queue = jnp.asarray(forcing.close_think + forcing.close_answer, jnp.int32)
    n_think = len(forcing.close_think)
    free = (phase == THINK) | (phase == ANSWER)
    close = free & ((count >= jnp.where(phase == THINK, budget.think_tokens, budget.answer_tokens)) | is_stop)
    pos = jnp.where(close, jnp.where(phase == THINK, 0, n_think), pos)
    phase = jnp.where(close, phase + 1, phase)
    forced = (phase == CLOSE_THINK) | (phase == CLOSE_ANSWER)
    # a finished row keeps pos past the queue's end; its tokens are padding anyway
    tok = jnp.where(forced, queue[jnp.minimum(pos, len(queue) - 1)], sampled)
    pos = pos + forced
    phase = jnp.where((phase == CLOSE_THINK) & (pos == n_think), ANSWER, phase)
    return tok, forced, phase, jnp.where(forced, 0, count + 1), pos


def generate_tokens(module: Decoder, params: Any, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array,
                    stop_ids: jax.Array, pad_id: int, cfg: SamplingConfig, cache_sharding=None,
                    forcing: Optional[ForcedTokens] = None):
    """Returns (tokens, mask, logprobs, entropies, forced) `[batch * G, max_new_tokens]` for left-padded prompts
    `[batch, prompt_len]`; pure and jittable (cfg, module, pad_id static; forcing's arrays are constants).

    With `forcing` (cfg.force enabled) each row runs the phases THINK -> CLOSE_THINK -> ANSWER -> CLOSE_ANSWER:
    in a closing phase the row's token comes from the forced queue instead of the sample, and is still fed
    through the model so the KV cache holds exactly the text the completion shows; `forced` is True there
    (None without forcing), and those tokens' log-probs and entropies are 0: they are not the policy's actions."""
    c = module.config
    b, plen = prompt.shape
    g, n = cfg.num_samples, cfg.max_new_tokens
    dtype = jnp.dtype(cfg.cache_dtype) if cfg.cache_dtype else c.compute_dtype

    def constrain(cache):
        if cache_sharding is None:
            return cache
        return cache._replace(k=jax.lax.with_sharding_constraint(cache.k, cache_sharding),
                              v=jax.lax.with_sharding_constraint(cache.v, cache_sharding))

    out = module.apply({"params": params}, prompt, None, prompt_mask, None, False, plen + n)
    logits = module.apply({"params": params}, out.hidden[:, -1], method=Decoder.unembed)
    cache = constrain(out.cache._replace(k=out.cache.k.astype(dtype), v=out.cache.v.astype(dtype)))
    if g > 1:  # the prompt is encoded once; its cache is repeated for the G samples
        rep = lambda x, axis: jnp.repeat(x, g, axis=axis)  # noqa: E731
        cache = constrain(cache._replace(k=rep(cache.k, 1), v=rep(cache.v, 1), valid=rep(cache.valid, 0)))
        logits = rep(logits, 0)
    rows = b * g

    def body(state):
        step, cache, logits, toks, lps, ents, done, key, force_state = state
        key, sub = jax.random.split(key)
        if forcing is None:
            tok = _choose(logits, sub, cfg)
        else:
            phase, count, pos, recent, forced = force_state
            tok = _choose(_ban(logits, count, recent, forcing, stop_ids), sub, cfg)
        lp, ent = _token_stats(logits, tok, cfg.temperature, cfg.return_entropies)
        live = ~done
        if forcing is not None:
            tok, now, phase, count, pos = _force(tok, jnp.isin(tok, stop_ids), phase, count, pos, forcing,
                                                 cfg.force)
            lp = jnp.where(now, 0.0, lp)
            ent = jnp.where(now, 0.0, ent) if cfg.return_entropies else None
            recent = jnp.concatenate([recent, tok[:, None]], axis=1)[:, 1:]  # sampled and forced alike
            force_state = (phase, count, pos, recent, forced.at[:, step].set(now & live))
        tok = jnp.where(live, tok, pad_id)
        toks = toks.at[:, step].set(tok)
        lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
        if cfg.return_entropies:
            ents = ents.at[:, step].set(jnp.where(live, ent, 0.0))
        done = done | jnp.isin(tok, stop_ids)
        out = module.apply({"params": params}, tok[:, None], None, live[:, None], cache, True)
        return step + 1, constrain(out.cache), out.logits[:, 0], toks, lps, ents, done, key, force_state

    def cond(state):
        step, done = state[0], state[6]
        return (step < n) & ~jnp.all(done)

    zeros = lambda dtype: jnp.zeros((rows,), dtype)  # noqa: E731
    force_state = ()
    if forcing is not None:  # phase, count, pos, the last tokens a tag prefix could end with (-1: none yet), forced
        w = max(len(p) for p in forcing.tag_prefixes)
        force_state = (zeros(jnp.int32), zeros(jnp.int32), zeros(jnp.int32), jnp.full((rows, w), -1, jnp.int32),
                       jnp.zeros((rows, n), bool))
    state = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((rows, n), pad_id, jnp.int32),
             jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows, n) if cfg.return_entropies else (0,), jnp.float32),
             jnp.zeros((rows,), bool), key, force_state)
    step, _, _, toks, lps, ents, _, _, force_state = jax.lax.while_loop(cond, body, state)
    # a token is real if no stop id came before it (the stop token itself is part of the completion); with
    # forcing, the only stop id is the last forced token (sampled ones were replaced)
    is_stop = jnp.isin(toks, stop_ids) & (jnp.arange(n)[None] < step)
    mask = (jnp.cumsum(is_stop, axis=1) - is_stop == 0) & (jnp.arange(n)[None] < step)
    forced = None if forcing is None else force_state[4]
    return toks, mask, lps, (ents if cfg.return_entropies else None), forced


class Sampler:
    """Generates completions for batches of prompts with one model; counts compiled programs.

    sampler = Sampler(model, SamplingConfig(max_new_tokens=256, temperature=1.0, top_p=0.95))
    out = sampler.generate([[{"role": "user", "content": "..."}], ...], key=jax.random.key(0))
    """

    def __init__(self, model, config: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] | None = None,
                 strategy=None):
        self.model = model
        # the rollout role's placement (default: the model's strategy without fsdp weight sharding): weights
        # are resharded once per generate call instead of all-gathered at every decoded token
        self.strategy = shd.inference_strategy(model.strategy) if strategy is None else strategy
        self.config = config
        tok = model.tokenizer
        if stop_ids is None:
            stop_ids = _default_stop_ids(tok)
        if not stop_ids:
            raise ValueError("no stop ids: pass stop_ids=[...] (the tokenizer has no EOS token)")
        self.stop_ids = tuple(sorted(set(int(s) for s in stop_ids)))
        self.pad_id = int(tok.pad_token_id if tok is not None and tok.pad_token_id is not None else self.stop_ids[0])
        self.mesh = model.mesh or shd.make_mesh(devices=jax.devices()[:1])
        self._batch_multiple = int(np.prod([self.mesh.shape[a] for a in shd.BATCH_AXES]))
        self._shapes: set[tuple[int, int]] = set()
        self.forcing = self._forced_tokens() if config.force.enabled else None
        self._fn = self._build()

    def _forced_tokens(self) -> ForcedTokens:
        """Returns the forced token ids of `config.force` in this tokenizer; raises when the tokenizer cannot
        write the tags or the decode budget cannot hold both blocks and their closing tokens."""
        from rporec_jax.data.parser import TAGS

        tok, cfg, vocab = self.model.tokenizer, self.config, self.model.config.vocab_size
        if tok is None:
            raise ValueError("format forcing writes the tags as tokens: the model needs a tokenizer")
        if not all(0 <= s < vocab for s in self.stop_ids):
            raise ValueError(f"format forcing ends each completion with a stop id; stop_ids {self.stop_ids} must "
                             f"be token ids in [0, {vocab})")

        def ids(text: str) -> tuple[int, ...]:
            out = [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]
            back = tok.decode(out)
            if missing := [t for t in TAGS if t in text and t not in back]:
                raise ValueError(f"format forcing: this tokenizer cannot write {missing[0]!r} ({text!r} encodes to "
                                 f"{out}, which decodes to {back!r})")
            return tuple(out)

        # the chat turn's own end marker when it is a stop id (SmolLM2, Qwen: <|im_end|> is the EOS)
        end = tok.eos_token_id if tok.eos_token_id in self.stop_ids else self.stop_ids[0]
        forcing = ForcedTokens(ids(TAGS[0]), ids(f"{TAGS[1]}\n{TAGS[2]}"), ids(TAGS[3]) + (int(end),),
                               *_tag_rules(tok, vocab))
        written = forcing.think_open + forcing.close_think + forcing.close_answer[:-1]
        if stopping := sorted(set(written) & set(self.stop_ids)):
            raise ValueError(f"format forcing: the tags' tokens {stopping} are stop ids {self.stop_ids}")
        f, n_forced = cfg.force, len(forcing.close_think) + len(forcing.close_answer)
        if (need := f.think_tokens + f.answer_tokens + n_forced) > cfg.max_new_tokens:
            raise ValueError(f"format forcing needs max_new_tokens >= think_tokens {f.think_tokens} + answer_tokens "
                             f"{f.answer_tokens} + {n_forced} forced tokens = {need}; max_new_tokens is "
                             f"{cfg.max_new_tokens}: raise it or lower the budgets")
        return forcing

    @property
    def compilations(self) -> int:
        """Returns how many distinct (batch, prompt bucket) programs have been compiled."""
        return len(self._shapes)

    def _build(self):
        from rporec_jax.models.loading import param_shardings

        cfg, mesh = self.config, self.mesh
        rules = shd.logical_rules(self.strategy)
        kv_axis = dict(rules).get("kv_heads")
        cache_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES, kv_axis, None, None))
        batch = shd.batch_sharding(mesh)
        module = Decoder(self.model.config, shd.activation_sharding(mesh, self.strategy))
        pad_id, stop_ids = self.pad_id, jnp.asarray(self.stop_ids, jnp.int32)
        self.param_shardings = param_shardings(self.model.config, mesh, self.strategy)

        def fn(params, prompt, prompt_mask, key):
            return generate_tokens(module, params, prompt, prompt_mask, key, stop_ids, pad_id, cfg, cache_sharding,
                                   self.forcing)

        return jax.jit(fn, in_shardings=(self.param_shardings, batch, batch, shd.replicated(mesh)),
                       out_shardings=batch)

    def encode(self, prompts: Sequence[Any]) -> list[list[int]]:
        """Returns token ids per prompt: ids pass through; chat message lists get the chat template."""
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(list(self.model.tokenizer(p)["input_ids"]))
            elif len(p) and isinstance(p[0], dict):
                enc = self.model.tokenizer.apply_chat_template(list(p), add_generation_prompt=True)
                out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
            else:
                out.append([int(t) for t in p])
        return out

    def _bucket(self, ids: list[list[int]]) -> int:
        cfg, limit = self.config, self.model.config.max_position_embeddings
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt row {i} is empty")
            if len(row) + cfg.max_new_tokens > limit:
                raise ValueError(f"prompt row {i}: {len(row)} prompt tokens + max_new_tokens {cfg.max_new_tokens} "
                                 f"= {len(row) + cfg.max_new_tokens} exceeds the model's context of {limit}")
        longest = max(len(r) for r in ids)
        for b in cfg.prompt_buckets:
            if b >= longest:
                return b
        row = max(range(len(ids)), key=lambda i: len(ids[i]))
        raise ValueError(f"prompt row {row} has {longest} tokens, over the largest prompt bucket "
                         f"{cfg.prompt_buckets[-1]}; add a larger bucket to SamplingConfig.prompt_buckets")

    def generate(self, prompts: Sequence[Any], key: jax.Array, params: Any = None) -> SampleOutput:
        """Returns completions for `prompts` (token id lists, strings or chat message lists)."""
        cfg = self.config
        ids = self.encode(prompts)
        if self.forcing is not None:  # the assistant turn opens with <think>: the completion is the CoT's inside
            ids = [row + list(self.forcing.think_open) for row in ids]
        bucket = self._bucket(ids)
        n_real = len(ids)
        batch = -(-n_real // self._batch_multiple) * self._batch_multiple
        prompt = np.full((batch, bucket), self.pad_id, np.int32)
        pmask = np.zeros((batch, bucket), bool)
        for i, row in enumerate(ids):
            prompt[i, bucket - len(row):] = row
            pmask[i, bucket - len(row):] = True
        pmask[n_real:, -1] = True  # filler rows: one token so they are well defined; dropped below
        if (batch, bucket) not in self._shapes:
            self._shapes.add((batch, bucket))
            log.info("sampler: compiling for batch %d, prompt bucket %d (%d programs so far)",
                     batch, bucket, len(self._shapes))
        params = self.model.params if params is None else params
        if self.strategy != self.model.strategy:  # the once-per-call reshard (an all-gather under fsdp)
            params = jax.device_put(params, self.param_shardings)
        toks, mask, lps, ents, forced = shd.to_host(
            self._fn(params, *shd.host_batch_to_global((prompt, pmask), self.mesh), key))
        keep = n_real * cfg.num_samples
        toks, mask, lps = toks[:keep], np.array(mask[:keep]), lps[:keep]
        ents = None if ents is None else ents[:keep]
        stopped = (mask & np.isin(toks, self.stop_ids)).any(axis=1)
        texts = []
        for r in range(keep):
            n = int(mask[r].sum())
            body = toks[r, :n - 1] if stopped[r] else toks[r, :n]
            text = self.model.tokenizer.decode(body) if self.model.tokenizer is not None else ""
            cut = _first_stop_string(self.model.tokenizer, body, cfg.stop_strings) if cfg.stop_strings else None
            if cut is not None:  # end the row after the token that completes the stop string
                n_keep, text = cut
                mask[r, n_keep:] = False
                stopped[r] = True
            texts.append(text)
        toks = np.where(mask, toks, self.pad_id)
        lps = np.where(mask, lps, 0.0)
        ents = None if ents is None else np.where(mask, ents, 0.0)
        forced = np.zeros_like(mask) if forced is None else forced[:keep] & mask
        rep = lambda x: np.repeat(x[:n_real], cfg.num_samples, axis=0)  # noqa: E731
        return SampleOutput(rep(prompt), rep(pmask), rep(pmask.sum(1)), toks, mask, lps, ents,
                            mask.sum(1), texts, stopped, forced)


def _first_stop_string(tokenizer, tokens: np.ndarray, stop_strings: Sequence[str]):
    """Returns (tokens to keep, text before the stop string) for the earliest stop string, or None."""
    text = tokenizer.decode(tokens)
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if not hits:
        return None
    pos, s = min(hits)
    end = pos + len(s)
    for k in range(1, len(tokens) + 1):  # shortest token prefix whose text contains the stop string
        if len(tokenizer.decode(tokens[:k])) >= end:
            return k, text[:pos]
    return len(tokens), text[:pos]


def _tag_rules(tokenizer, vocab: int) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """Returns (tag_prefixes, tag_bans bool `[rules, vocab]`) of `ForcedTokens`: for every tag and every split of
    the tokenizer's own spelling of it into the tokens already written and the rest, the tokens whose text starts
    with the rest. A model copying a forced tag token by token (SmolLM2 does) cannot finish it; a tag spelled
    with other tokens can still get through (the format flag then says so)."""
    from rporec_jax.data.parser import TAGS

    texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))])
    rules: dict[tuple[int, ...], np.ndarray] = {}
    for tag in TAGS:
        ids = tuple(int(t) for t in tokenizer(tag, add_special_tokens=False)["input_ids"])
        for j in range(len(ids)):
            written = tokenizer.decode(list(ids[:j]))
            if not tag.startswith(written) or written == tag:  # pieces that do not spell the tag left to right
                continue
            rest = tag[len(written):]
            ban = rules.setdefault(ids[:j], np.zeros(vocab, bool))
            ban[:len(texts)] |= np.asarray([t.startswith(rest) for t in texts])
    return tuple(rules), np.stack(list(rules.values()))


def _default_stop_ids(tokenizer) -> list[int]:
    """Returns the tokenizer's EOS id plus chat end markers it knows (`<|im_end|>`, `<|eot_id|>`, ...)."""
    if tokenizer is None:
        return []
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>"):
        if marker in vocab:
            ids.add(int(vocab[marker]))
    return sorted(ids)
