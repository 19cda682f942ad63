"""Sampler: stops, log-probs vs a full forward, top-k/top-p sets, determinism, G samples, sharding, budget forcing
of the answer format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rporec_jax import sampling, sharding as shd
from rporec_jax.models import DecoderConfig, Model
from rporec_jax.models.loading import init_params, param_shardings
from rporec_jax.data.parser import parse_output
from rporec_jax.models.decoder import Decoder
from rporec_jax.sampling import ForceFormat, ForcedTokens, Sampler, SamplingConfig, _ban, _choose, _tag_rules, \
    _token_stats, filter_logits, generate_tokens
from tiny_tokenizer import make_tiny_tokenizer

CONFIG = DecoderConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_position_embeddings=96)
PROMPTS = [[5, 9, 13, 4, 22], [7, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48]]


@pytest.fixture(scope="module")
def model(mesh1):
    params = init_params(CONFIG, jax.random.key(3), mesh1)
    # scale up the logits so greedy/sampled outputs are far from ties
    params["embed"]["embedding"] = params["embed"]["embedding"] * 8
    return Model(CONFIG, params, make_tiny_tokenizer(64), mesh=mesh1)


def _greedy(model, n=12, stop_ids=(63,), **kw):
    return Sampler(model, SamplingConfig(max_new_tokens=n, temperature=0.0, prompt_buckets=(16, 32), **kw),
                   stop_ids=stop_ids)


def test_stop_ids_end_rows_and_pad_the_rest(model):
    free = _greedy(model).generate(PROMPTS, jax.random.key(0))
    assert not free.stopped.any() and (free.lengths == 12).all()
    assert free.forced.shape == free.mask.shape and not free.forced.any()  # no budget forcing: nothing forced
    stop = int(free.tokens[0, 3])  # row 0 must end at its 4th token, the stop token included
    first_hits = [np.flatnonzero(free.tokens[r] == stop) for r in range(3)]
    out = _greedy(model, stop_ids=(stop,)).generate(PROMPTS, jax.random.key(0))
    for r, hits in enumerate(first_hits):
        expect = int(hits[0]) + 1 if len(hits) else 12
        assert out.lengths[r] == expect and out.stopped[r] == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[r, :expect], free.tokens[r, :expect])
        assert (out.tokens[r, expect:] == 0).all() and not out.mask[r, expect:].any()
        assert (out.logprobs[r, expect:] == 0).all()
    assert stop not in model.tokenizer.encode(out.texts[0])  # text excludes the stop token
    assert out.texts[0] == model.tokenizer.decode(free.tokens[0, :3])


def test_stop_strings_cut_text_and_mask(model):
    free = _greedy(model).generate(PROMPTS, jax.random.key(0))
    words = free.texts[1].split()
    stop = " ".join(words[4:6])
    out = _greedy(model, stop_strings=(stop,)).generate(PROMPTS, jax.random.key(0))
    assert out.texts[1] == " ".join(words[:4]) + " " and out.stopped[1]
    assert out.lengths[1] == 6  # through the token that completes the stop string
    assert not out.mask[1, 6:].any()


def test_logprobs_equal_full_forward_recompute(model):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.9, num_samples=2, prompt_buckets=(16,),
                         return_entropies=True)
    out = Sampler(model, cfg, stop_ids=(1,)).generate(PROMPTS, jax.random.key(1))
    tokens = np.concatenate([out.prompt_tokens, out.tokens], 1)
    mask = np.concatenate([out.prompt_mask, out.mask], 1)
    logits = np.asarray(model.apply(model.params, tokens, mask=mask), np.float64) / 0.7
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    plen = out.prompt_tokens.shape[1]
    pred = logp[:, plen - 1:-1]  # position t predicts token t + 1
    want = np.take_along_axis(pred, out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs[out.mask], want[out.mask], atol=1e-4)
    ent = -(np.exp(pred) * pred).sum(-1)
    np.testing.assert_allclose(out.entropies[out.mask], ent[out.mask], atol=1e-4)


def test_top_k_and_top_p_sample_only_the_allowed_set():
    logits = jnp.log(jnp.array([[0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]]))
    draws = lambda cfg: np.asarray(jax.vmap(lambda k: _choose(logits, k, cfg))(  # noqa: E731
        jax.random.split(jax.random.key(0), 4000)))[:, 0]
    # top-p 0.75: 0.40 + 0.25 < 0.75 <= 0.80 -> tokens {0, 1, 2}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.75))) == {0, 1, 2}
    assert set(draws(SamplingConfig(temperature=1.0, top_k=4))) == {0, 1, 2, 3}
    assert set(draws(SamplingConfig(temperature=1.0, top_k=2, top_p=0.9))) == {0, 1}
    assert set(draws(SamplingConfig(temperature=1.0, top_p=0.3))) == {0}
    kept = np.isfinite(np.asarray(filter_logits(logits, 0, 0.95)))[0]
    np.testing.assert_array_equal(kept, [1, 1, 1, 1, 1, 0, 0])


def _nucleus_reference(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The textbook nucleus in float64: sort, keep while the mass before a token is < top_p."""
    out = np.zeros(logits.shape, bool)
    for r, row in enumerate(logits.astype(np.float64)):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p
        out[r] = p >= p[order][keep].min()
    return out


@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_nucleus_matches_a_sorted_reference_on_both_paths(top_p):
    # peaked rows keep a few tokens (found among the top-k candidates), flat rows keep hundreds (more than
    # TOP_P_CANDIDATES: the whole-vocabulary bisection); a batch of only peaked rows skips the bisection
    rng = np.random.default_rng(0)
    peaked = rng.normal(size=(6, 1000)) * 4.0
    flat = rng.normal(size=(6, 1000)) * 0.3
    mixed = np.concatenate([peaked, flat]).astype(np.float32)
    sizes = _nucleus_reference(mixed, top_p).sum(1)
    assert sizes[:6].max() < sampling.TOP_P_CANDIDATES < sizes[6:].min()
    for batch in (mixed, mixed[:6]):
        kept = np.isfinite(np.asarray(jax.jit(lambda x: filter_logits(x, 0, top_p))(batch)))
        np.testing.assert_array_equal(kept, _nucleus_reference(batch, top_p))


def test_deterministic_per_key_and_g_samples_differ(model):
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=3, prompt_buckets=(16,))
    s = Sampler(model, cfg, stop_ids=(1,))
    a, b = s.generate(PROMPTS, jax.random.key(7)), s.generate(PROMPTS, jax.random.key(7))
    c = s.generate(PROMPTS, jax.random.key(8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert a.tokens.shape == (9, 8)
    np.testing.assert_array_equal(a.prompt_lengths, [5, 5, 5, 2, 2, 2, 9, 9, 9])
    assert len({tuple(a.tokens[i]) for i in range(3)}) > 1  # samples of one prompt differ
    assert s.compilations == 1


def test_greedy_g_samples_repeat_the_single_sample(model):
    one = _greedy(model, n=6).generate(PROMPTS, jax.random.key(0))
    three = Sampler(model, SamplingConfig(max_new_tokens=6, temperature=0.0, num_samples=3, prompt_buckets=(16,)),
                    stop_ids=(63,)).generate(PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(three.tokens, np.repeat(one.tokens, 3, axis=0))


def test_bucketing_bounds_compilations(model):
    s = _greedy(model, n=4)
    s.generate([[5, 6]], jax.random.key(0))
    s.generate([[5, 6, 7, 8, 9]], jax.random.key(0))  # same bucket 16, same batch
    assert s.compilations == 1
    s.generate([list(range(2, 22))], jax.random.key(0))  # bucket 32
    assert s.compilations == 2


def test_requests_that_cannot_fit_are_errors(model):
    with pytest.raises(ValueError, match=r"prompt row 1: 90 prompt tokens \+ max_new_tokens 12 = 102 exceeds"):
        _greedy(model).generate([[5], [6] * 90], jax.random.key(0))
    with pytest.raises(ValueError, match="prompt row 0 has 40 tokens, over the largest prompt bucket 32"):
        _greedy(model).generate([[6] * 40], jax.random.key(0))


@pytest.mark.parametrize("strategy,mesh_cfg", [("fsdp", shd.MeshConfig(data=2, fsdp=4)),
                                               ("tp", shd.MeshConfig(data=4, tp=2)),
                                               ("fsdp_tp", shd.MeshConfig(data=1, fsdp=4, tp=2))])
def test_sharded_greedy_equals_one_device(model, strategy, mesh_cfg):
    expected = _greedy(model).generate(PROMPTS, jax.random.key(0))
    mesh = shd.make_mesh(mesh_cfg)
    params = jax.device_put(jax.device_get(model.params), param_shardings(CONFIG, mesh, strategy))
    sharded = Model(CONFIG, params, model.tokenizer, mesh=mesh, strategy=strategy)
    out = _greedy(sharded).generate(PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-4)


def test_rollout_role_holds_weights_without_fsdp(model):
    # fsdp training weights are resharded once per generate call, not gathered at every decoded token
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4))
    params = jax.device_put(jax.device_get(model.params), param_shardings(CONFIG, mesh, "fsdp"))
    sampler = _greedy(Model(CONFIG, params, model.tokenizer, mesh=mesh, strategy="fsdp"))
    assert sampler.strategy == "dp" and shd.inference_strategy("fsdp_tp") == "tp"
    assert all(s.spec == P() or all(a is None for a in s.spec) for s in jax.tree_util.tree_leaves(
        sampler.param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))
    assert shd.inference_strategy({"embed": "fsdp", "mlp": "tp", "heads": ("fsdp", "tp")}) == {"mlp": "tp"}


# ---------------------------------------------------------------------------------------------------------------
# Budget forcing of the <think>..</think><answer>..</answer> format
# ---------------------------------------------------------------------------------------------------------------

FORCE_PROMPTS = PROMPTS + [[11, 12], [30, 31, 32, 33], [20, 21, 22]]
THINK, ANSWER = 6, 4  # budgets: sampled tokens per block


@pytest.fixture(scope="module")
def tag_model(mesh1):
    """A random decoder (unscaled logits: greedy rows differ) whose last four token ids are the format tags."""
    return Model(CONFIG, init_params(CONFIG, jax.random.key(3), mesh1), make_tiny_tokenizer(64, tags=True),
                 mesh=mesh1)


def _forcing_sampler(model, stop_ids, n=20, **kw):
    cfg = SamplingConfig(max_new_tokens=n, prompt_buckets=(16,), force=ForceFormat(True, THINK, ANSWER), **kw)
    return Sampler(model, cfg, stop_ids=stop_ids)


def _blocks(out, r):
    """Returns (think block, answer block) token lists of a forced row: the sampled runs between forced runs."""
    toks, forced = out.tokens[r, :out.lengths[r]], out.forced[r, :out.lengths[r]]
    t = int(np.argmax(forced))  # first forced position
    a = t + 2 + int(np.argmax(forced[t + 2:]))
    return toks[:t].tolist(), toks[t + 2:a].tolist()


def test_forced_format_greedy_follows_the_model_until_a_budget_or_stop(tag_model):
    # A first run picks an extra stop id s that, in the second run, ends one row's reasoning early, leaves another
    # row's reasoning to its budget and ends that row's answer early; the checks below hold for every row.
    first = _forcing_sampler(tag_model, (1,), temperature=0.0).generate(FORCE_PROMPTS, jax.random.key(0))
    blocks = [_blocks(first, r) for r in range(len(FORCE_PROMPTS))]
    stop = next(s for s in range(2, 60)
                if any(s in th[1:] for th, _ in blocks) and any(s not in th and s in an[1:] for th, an in blocks))
    sampler = _forcing_sampler(tag_model, (1, stop), temperature=0.0)
    out = sampler.generate(FORCE_PROMPTS, jax.random.key(0))
    ft = sampler.forcing
    assert ft.think_open == (60,) and ft.close_think == (61, 62) and ft.close_answer == (63, 1)
    # each tag is one token here: never sampled, whatever came before
    tags = [60, 61, 62, 63]
    assert ft.tag_prefixes == ((),) and np.flatnonzero(ft.tag_bans[0]).tolist() == tags
    assert (out.prompt_tokens[:, -1] == 60).all()  # the assistant turn opens with <think>

    # the model's own next-token logits over prompt + completion, from one full forward pass
    plen = out.prompt_tokens.shape[1]
    seq = np.concatenate([out.prompt_tokens, out.tokens], 1)
    full_mask = np.concatenate([out.prompt_mask, out.mask], 1)
    logits = np.asarray(jax.jit(tag_model.apply)(tag_model.params, seq, mask=full_mask), np.float64)[:, plen - 1:-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    cases = set()
    for r in range(len(FORCE_PROMPTS)):
        n = int(out.lengths[r])
        toks, forced = out.tokens[r, :n], out.forced[r, :n]
        think, answer = _blocks(out, r)
        t, a = len(think), len(answer)
        assert 1 <= t <= THINK and 1 <= a <= ANSWER and n == t + 2 + a + 2
        np.testing.assert_array_equal(forced, [0] * t + [1, 1] + [0] * a + [1, 1])
        np.testing.assert_array_equal(toks[t:t + 2], ft.close_think)
        np.testing.assert_array_equal(toks[-2:], ft.close_answer)
        assert out.stopped[r] and out.mask[r, :n].all() and not out.mask[r, n:].any()
        assert not out.forced[r, n:].any()
        for j in range(n):
            allowed = logits[r, j].copy()
            allowed[tags] = -np.inf
            if j in (0, t + 2):  # a block's first token is never a stop id
                allowed[[1, stop]] = -np.inf
            if not forced[j]:  # sampled (greedy) tokens are the model's choice, after forced tokens too: the
                # forced tokens went through the model, so the KV cache holds them
                assert logits[r, j, toks[j]] >= allowed.max() - 1e-4, (r, j)
                np.testing.assert_allclose(out.logprobs[r, j], logp[r, j, toks[j]], atol=1e-4)
            else:
                assert out.logprobs[r, j] == 0  # not an action
        for start, length, budget, name in ((0, t, THINK, "think"), (t + 2, a, ANSWER, "answer")):
            end = start + length  # where the closing sequence begins
            if length < budget:  # closed early: the model chose a stop id there, replaced by the closing tokens
                allowed = np.where(np.isin(np.arange(64), tags), -np.inf, logits[r, end])
                assert allowed[[1, stop]].max() >= allowed.max() - 1e-4, (r, name)
                cases.add(f"{name} stopped")
            else:
                cases.add(f"{name} budget")
        p = parse_output(out.texts[r], assume_think_open=True)
        assert p.format_ok == 1, out.texts[r]
        assert p.cot == tag_model.tokenizer.decode(think) and p.answer == tag_model.tokenizer.decode(answer)
    assert cases == {"think stopped", "think budget", "answer stopped", "answer budget"}, cases


def test_forced_format_sampled_rows_all_parse(tag_model):
    out = _forcing_sampler(tag_model, (1,), temperature=1.0, top_p=0.95, num_samples=3,
                           return_entropies=True).generate(FORCE_PROMPTS, jax.random.key(5))
    assert out.tokens.shape == (3 * len(FORCE_PROMPTS), 20)
    for r in range(len(out.texts)):
        assert parse_output(out.texts[r], assume_think_open=True).format_ok == 1, out.texts[r]
        n = int(out.lengths[r])
        forced = out.forced[r, :n]
        assert forced.sum() == 4 and forced[-2:].all() and out.stopped[r]
        assert (out.logprobs[r][out.forced[r]] == 0).all() and (out.entropies[r][out.forced[r]] == 0).all()
        assert (out.logprobs[r, :n][~forced] < 0).all() and (out.entropies[r, :n][~forced] > 0).all()
    assert len({out.texts[r] for r in range(3)}) > 1  # samples of one prompt differ


def _piece_tokenizer():
    """Returns a tokenizer that spells tags in pieces, as byte-level BPE does (`<`, `think`, `>`; `>>` too)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "<eos>", "<", "</", "think", "answer", ">", ">>", "\n"] + [f"w{i}" for i in range(7)]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("</|<|>>|>|think|answer|\n|w\\d"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # the pieces concatenate back to the exact text
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_tags_spelled_in_pieces_cannot_be_finished_by_sampling():
    tok = _piece_tokenizer()
    assert tok.decode(tok("</think>\n<answer>", add_special_tokens=False)["input_ids"]) == "</think>\n<answer>"
    prefixes, bans = _tag_rules(tok, 16)
    rules = {p: np.flatnonzero(b).tolist() for p, b in zip(prefixes, bans)}
    # `<`/`</` (2/3) then `think`/`answer` (4/5): only `>` or `>>` (6/7) would finish the tag
    assert rules == {(): [], (2,): [], (3,): [], (2, 4): [6, 7], (3, 4): [6, 7], (2, 5): [6, 7], (3, 5): [6, 7]}
    forcing = ForcedTokens((2, 4, 6), (3, 4, 6, 8, 2, 5, 6), (3, 5, 6, 1), prefixes, bans)
    recent = np.array([[2, 4], [9, 4], [3, 5], [-1, -1]], np.int32)  # after `<think`, `w0think`, `</answer`, nothing
    count = np.array([3, 3, 0, 3])  # row 2 starts a block: no stop id either
    got = np.isinf(np.asarray(_ban(jnp.zeros((4, 16)), count, recent, forcing, jnp.asarray([1]))))
    want = np.zeros((4, 16), bool)
    want[[0, 0, 2, 2, 2], [6, 7, 6, 7, 1]] = True
    np.testing.assert_array_equal(got, want)


def test_forcing_refuses_what_it_cannot_write(model, tag_model):
    with pytest.raises(ValueError, match="cannot write '<think>'"):
        _forcing_sampler(model, (1,))  # w-words only: no token decodes to a tag
    with pytest.raises(ValueError, match=r"needs max_new_tokens >= think_tokens 6 \+ answer_tokens 4 \+ 4 forced "
                                         r"tokens = 14; max_new_tokens is 13"):
        _forcing_sampler(tag_model, (1,), n=13)
    with pytest.raises(ValueError, match="stop_ids"):
        _forcing_sampler(tag_model, (-1,))


def _decode_loop_before_forcing(module, params, prompt, prompt_mask, key, stop_ids, pad_id, cfg):
    """The sampler's decode loop as it was before budget forcing existed (the bit-for-bit reference)."""
    b, plen = prompt.shape
    g, n = cfg.num_samples, cfg.max_new_tokens
    out = module.apply({"params": params}, prompt, None, prompt_mask, None, False, plen + n)
    logits = module.apply({"params": params}, out.hidden[:, -1], method=Decoder.unembed)
    cache = out.cache
    if g > 1:
        rep = lambda x, axis: jnp.repeat(x, g, axis=axis)  # noqa: E731
        cache = cache._replace(k=rep(cache.k, 1), v=rep(cache.v, 1), valid=rep(cache.valid, 0))
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
        ents = ents.at[:, step].set(jnp.where(live, ent, 0.0))
        done = done | jnp.isin(tok, stop_ids)
        out = module.apply({"params": params}, tok[:, None], None, live[:, None], cache, True)
        return step + 1, out.cache, out.logits[:, 0], toks, lps, ents, done, key

    state = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((rows, n), pad_id, jnp.int32),
             jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows,), bool), key)
    step, _, _, toks, lps, ents, _, _ = jax.lax.while_loop(lambda s: (s[0] < n) & ~jnp.all(s[6]), body, state)
    is_stop = jnp.isin(toks, stop_ids) & (jnp.arange(n)[None] < step)
    mask = (jnp.cumsum(is_stop, axis=1) - is_stop == 0) & (jnp.arange(n)[None] < step)
    return toks, mask, lps, ents


def test_forcing_off_leaves_the_sampler_bit_for_bit_unchanged(model):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, num_samples=2, prompt_buckets=(16,),
                         return_entropies=True)
    prompt = np.zeros((4, 16), np.int32)
    pmask = np.zeros((4, 16), bool)
    for i, row in enumerate(FORCE_PROMPTS[:4]):
        prompt[i, 16 - len(row):], pmask[i, 16 - len(row):] = row, True
    stop_ids = jnp.asarray([1, 7], jnp.int32)  # 7 ends some rows early: the masks are ragged
    args = (model.params, prompt, pmask, jax.random.key(2))
    module = Decoder(CONFIG)
    got = jax.jit(lambda *a: generate_tokens(module, *a, stop_ids, 0, cfg))(*args)
    want = jax.jit(lambda *a: _decode_loop_before_forcing(module, *a, stop_ids, 0, cfg))(*args)
    assert got[4] is None  # no forced mask without forcing
    for g, w in zip(got[:4], want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert 0 < int(np.asarray(got[1]).sum()) < got[1].size
