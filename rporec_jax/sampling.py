"""KV-cache sampler: left-padded prefill, then one jitted `lax.while_loop` decoding every row until it stops.

Used for stage-1 CoT generation, GRPO rollouts (G samples per prompt), the reward's summariser and
evaluation. Prompts are left-padded to a length bucket and the batch to a multiple of the mesh's batch
size, so a long run compiles a bounded number of programs (counted in `Sampler.compilations`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rporec_jax import sharding as shd
from rporec_jax.models.decoder import Decoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. temperature 0 = greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    stop_strings: tuple[str, ...] = ()
    return_entropies: bool = False
    cache_dtype: Optional[str] = None  # default: the model's compute dtype

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
    when a stop id or stop string ended the row.
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


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Returns logits `[rows, vocab]` with tokens outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass strictly before it is < top_p (so the most likely token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


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


def generate_tokens(module: Decoder, params: Any, prompt: jax.Array, prompt_mask: jax.Array, key: jax.Array,
                    stop_ids: jax.Array, pad_id: int, cfg: SamplingConfig, cache_sharding=None):
    """Returns (tokens, mask, logprobs, entropies) `[batch * G, max_new_tokens]` for left-padded prompts
    `[batch, prompt_len]`; pure and jittable (cfg, module, pad_id static)."""
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
        step, cache, logits, toks, lps, ents, done, key = state
        key, sub = jax.random.split(key)
        tok = _choose(logits, sub, cfg)
        lp, ent = _token_stats(logits, tok, cfg.temperature, cfg.return_entropies)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        toks = toks.at[:, step].set(tok)
        lps = lps.at[:, step].set(jnp.where(live, lp, 0.0))
        if cfg.return_entropies:
            ents = ents.at[:, step].set(jnp.where(live, ent, 0.0))
        done = done | jnp.isin(tok, stop_ids)
        out = module.apply({"params": params}, tok[:, None], None, live[:, None], cache, True)
        return step + 1, constrain(out.cache), out.logits[:, 0], toks, lps, ents, done, key

    def cond(state):
        step, done = state[0], state[6]
        return (step < n) & ~jnp.all(done)

    state = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((rows, n), pad_id, jnp.int32),
             jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows, n) if cfg.return_entropies else (0,), jnp.float32),
             jnp.zeros((rows,), bool), key)
    step, _, _, toks, lps, ents, _, _ = jax.lax.while_loop(cond, body, state)
    # a token is real if no stop id came before it (the stop token itself is part of the completion)
    is_stop = jnp.isin(toks, stop_ids) & (jnp.arange(n)[None] < step)
    mask = (jnp.cumsum(is_stop, axis=1) - is_stop == 0) & (jnp.arange(n)[None] < step)
    return toks, mask, lps, (ents if cfg.return_entropies else None)


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
        self._fn = self._build()

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
            return generate_tokens(module, params, prompt, prompt_mask, key, stop_ids, pad_id, cfg, cache_sharding)

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
        toks, mask, lps, ents = shd.to_host(
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
        rep = lambda x: np.repeat(x[:n_real], cfg.num_samples, axis=0)  # noqa: E731
        return SampleOutput(rep(prompt), rep(pmask), rep(pmask.sum(1)), toks, mask, lps, ents,
                            mask.sum(1), texts, stopped)


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
