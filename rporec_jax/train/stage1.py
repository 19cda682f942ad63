"""Stage 1: train the Rechead (sampled-softmax CE over target + K negatives); the LLM is untouched.

    state = stage1_state(head_cfg, head_params, item_matrix, OptimConfig(lr=1e-3), key)
    step = make_stage1_step(head_cfg, state, mesh)
    state, metrics = step(state, batch)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Callable, Iterator, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from rporec_jax import sharding as shd
from rporec_jax.losses import sampled_softmax_ce
from rporec_jax.models.rechead import Rechead, RecheadConfig, item_vectors
from rporec_jax.train import resume as _resume
from rporec_jax.train.state import OptimConfig, TrainState, add_params, attach_optimizer, compose, set_trainable

log = logging.getLogger(__name__)


def stage1_state(head: RecheadConfig, head_params: dict, item_matrix, optim: OptimConfig, key: jax.Array,
                 mesh: Optional[Mesh] = None, strategy="dp") -> TrainState:
    """Returns a TrainState holding the Rechead (trainable) and the item matrix `[items + 1, dim]` (frozen,
    zero-padded to a shardable row count), placed on `mesh`: the item matrix shards over items under fsdp
    strategies; the Rechead follows `strategy`'s rules."""
    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    shardings = shd.tree_shardings(head_params, mesh, strategy)
    head_params = jax.device_put(nn.unbox(head_params), shardings)
    rules = shd.logical_rules(strategy)
    items = np.asarray(item_matrix, np.float32)
    # Zero rows pad the matrix to a multiple of the mesh axes holding 'items' (ids past the catalogue are
    # never targets, negatives or ranked: evaluation slices the real [items + 1] rows).
    multiple = int(np.prod([mesh.shape[a] for a in np.atleast_1d(dict(rules).get("items") or [])], dtype=int))
    items = np.pad(items, [(0, -len(items) % multiple), (0, 0)])
    items = jax.device_put(items, shd.logical_to_sharding(jax.sharding.PartitionSpec("items", None), items.shape,
                                                          mesh, rules, "item_matrix"))
    return compose(add_params("rechead", head_params), add_params("items", items), set_trainable("rechead"),
                   attach_optimizer(optim.make()))(TrainState.create({}, key, mesh))


def user_vectors(head: RecheadConfig, params: dict, batch: dict, deterministic: bool = True, key=None):
    """Returns user vectors `[batch, dim]` of the Rechead in `params['rechead']`."""
    rngs = None if deterministic else {"dropout": key}
    return Rechead(head).apply({"params": params["rechead"]["user"]}, batch, deterministic, rngs=rngs)


def stage1_loss(head: RecheadConfig, train: dict, frozen: dict, batch: dict, key: jax.Array):
    """Returns (loss, metrics) of one batch with dropout on."""
    params = {**frozen, **train}
    u = user_vectors(head, params, batch, deterministic=False, key=key)
    items = item_vectors(head, params["rechead"], params["items"])
    return sampled_softmax_ce(u, items, batch["target"], batch["negatives"], batch.get("valid"))


def stage1_step_fn(head: RecheadConfig) -> Callable:
    """Returns the pure stage-1 step `(state, batch) -> (state, metrics)` (what `make_stage1_step` jits and
    `rporec_jax.plan` compiles for a TPU topology)."""
    def step(state: TrainState, batch: dict):
        state, key = state.next_key()
        train, frozen = state.split_params()
        grads, metrics = jax.grad(lambda t: stage1_loss(head, t, frozen, batch, key), has_aux=True)(train)
        state, gnorm = state.apply_gradients(grads)
        return state, {**metrics, "grad_norm": gnorm}
    return step


def make_stage1_step(head: RecheadConfig, state: TrainState, mesh: Optional[Mesh] = None) -> Callable:
    """Returns the jitted pure step `(state, batch) -> (state, metrics)` with explicit shardings: the state
    keeps its placement (donated), the batch is split over ('data', 'fsdp')."""
    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    step = stage1_step_fn(head)
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    batch_sharding = lambda b: {k: shd.batch_sharding(mesh, np.ndim(v)) for k, v in b.items()}  # noqa: E731
    compiled = {}

    def run(state: TrainState, batch: dict):
        sig = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
        if sig not in compiled:  # one program per batch signature (the last partial batch is padded)
            compiled[sig] = jax.jit(step, in_shardings=(state_shardings, batch_sharding(batch)),
                                    out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)
        return compiled[sig](state, shd.host_batch_to_global(batch, mesh))

    return run


@dataclasses.dataclass(frozen=True)
class Stage1Config:
    """Stage-1 training loop settings (reference: AdamW lr 1e-3, batch 128, K = 49 negatives)."""

    batch_size: int = 128
    epochs: int = 10
    optim: OptimConfig = OptimConfig()
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # steps between validations; 0 = at the end of every epoch
    select_metric: str = "ndcg@10"  # on valid; the best step's Rechead is kept and reported on test
    checkpoint_dir: Optional[str] = None  # orbax checkpoint of the best Rechead (max_to_keep=1)


def iterate_batches(examples: dict, batch_size: int, rng: np.random.Generator, shuffle: bool = True,
                    multiple: int = 1) -> Iterator[dict]:
    """Yields batches of `examples` ({name: array [n, ...]}); the last one is padded up to a multiple of
    `multiple` rows with `valid=False` rows so shapes stay few and shardable."""
    n = len(next(iter(examples.values())))
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        size = -(-len(idx) // multiple) * multiple if len(idx) < batch_size else batch_size
        padded = np.concatenate([idx, np.repeat(idx[:1], size - len(idx))])
        batch = {k: v[padded] for k, v in examples.items()}
        batch["valid"] = np.arange(size) < len(idx)
        yield batch


def fit_stage1(state: TrainState, head: RecheadConfig, examples: dict, cfg: Stage1Config,
               mesh: Optional[Mesh] = None, on_eval: Optional[Callable] = None,
               should_stop: Optional[Callable[[], bool]] = None, start: Optional[dict] = None):
    """Returns (trained state, per-epoch history) after `cfg.epochs` passes over `examples` with a progress
    bar; `on_eval(step, state) -> dict` runs every `cfg.eval_every` steps (or at each epoch's end) and its
    metrics go into the history.

    `should_stop()` is polled before every step: when it returns True, `Stopped` is raised carrying the state
    and `loop` (epoch, batches done in it, its losses and validations so far, the history); passing that `loop`
    as `start` with the stopped state continues exactly as if never stopped (same batches, keys, history)."""
    import itertools

    from tqdm.auto import tqdm

    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    multiple = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    step = make_stage1_step(head, state, mesh)
    rng = np.random.default_rng(cfg.seed)
    n = len(next(iter(examples.values())))
    steps_per_epoch = -(-n // cfg.batch_size)
    start = start or {}
    first_epoch, first_batch = start.get("epoch", 0), start.get("batch", 0)
    # JSON (a saved `loop`) turns the validations' step keys into strings
    history = [{**r, **({"evals": {int(k): v for k, v in r["evals"].items()}} if "evals" in r else {})}
               for r in start.get("history", [])]
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="stage 1", unit="step",
              initial=first_epoch * steps_per_epoch + first_batch) as bar:
        for epoch in range(cfg.epochs):
            if epoch < first_epoch:
                rng.permutation(n)  # the order that epoch drew (iterate_batches draws exactly this)
                continue
            t0, losses = time.perf_counter(), []
            evals = {}
            batches = iterate_batches(examples, cfg.batch_size, rng, multiple=multiple)
            if epoch == first_epoch and first_batch:
                losses = [np.float32(x) for x in start["losses"]]
                evals = {int(k): v for k, v in start["evals"].items()}
                batches = itertools.islice(batches, first_batch, None)
            for b, batch in enumerate(batches, start=len(losses)):
                if should_stop is not None and should_stop():
                    raise _resume.Stopped(f"stage1 at step {int(state.step)}", state,
                                  {"epoch": epoch, "batch": b, "losses": [float(x) for x in shd.to_host(losses)],
                                   "evals": evals, "history": history})
                state, metrics = step(state, batch)
                losses.append(metrics["loss"])
                bar.update(1)
                if len(losses) % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{float(losses[-1]):.4f}")
                if on_eval is not None and cfg.eval_every and int(state.step) % cfg.eval_every == 0:
                    evals[int(state.step)] = on_eval(int(state.step), state)
            row = {"epoch": epoch + 1, "step": int(state.step), "loss": float(np.mean(shd.to_host(losses))),
                   "examples_per_s": n / (time.perf_counter() - t0)}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"stage 1 epoch {epoch + 1} (step {row['step']}): the sampled-softmax loss "
                                         f"is {row['loss']}; lower stage1.optim.lr or check the inputs")
            if on_eval is not None and not cfg.eval_every:
                evals[int(state.step)] = on_eval(int(state.step), state)
            if evals:
                row["evals"] = evals
            history.append(row)
            log.info("stage 1 epoch %d: %s", epoch + 1, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
    return state, history


_HEAD_INPUTS = ("prompt_ids", "prompt_mask", "cot_ids", "cot_mask", "answer_ids", "answer_mask", "format", "hidden")


@functools.lru_cache(maxsize=None)
def _eval_fns(head: RecheadConfig):
    """Returns jitted (user vectors, item vectors) for `head`, built once so repeated validations reuse the
    compiled programs instead of tracing fresh lambdas every call."""
    users = jax.jit(lambda p, b: user_vectors(head, p, b))
    items = jax.jit(lambda p: item_vectors(head, p["rechead"], p["items"]))
    return users, items


def evaluate_rechead(state: TrainState, head: RecheadConfig, examples: dict, num_items: int,
                     mesh: Optional[Mesh] = None, strategy="dp", eval_config=None, batch_size: int = 256,
                     keep_ranks: bool = False) -> dict:
    """Returns full-ranking metrics ({'ndcg@K', 'hr@K', 'count'}) of the Rechead in `state` on `examples`;
    `keep_ranks` adds the per-instance 'ranks' and 'index' (see `rporec_jax.eval.evaluate`)."""
    from rporec_jax.eval import EvalConfig, evaluate

    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    eval_config = eval_config or EvalConfig()
    users, item_fn = _eval_fns(head)
    items = item_fn(state.params)
    multiple = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))

    def fn(batch):
        return users(state.params, {k: v for k, v in batch.items() if k in _HEAD_INPUTS})

    batches = iterate_batches(examples, batch_size, np.random.default_rng(0), shuffle=False, multiple=multiple)
    return evaluate(fn, batches, eval_config, item_matrix=items, num_items=num_items, mesh=mesh, strategy=strategy,
                    keep_ranks=keep_ranks)


def run_stage1(ds, encoder, head: RecheadConfig, cfg: Stage1Config, cot: Optional[dict] = None,
               mesh: Optional[Mesh] = None, strategy="dp", eval_splits=("valid", "test"), limit=None,
               eval_config=None, llm=None, should_stop: Optional[Callable[[], bool]] = None):
    """Returns (state, report) after training a Rechead on `ds`'s train split and evaluating it with full
    ranking on `eval_splits` after every epoch (valid) and at the end (all). Text variants: towers start
    from the static `encoder`'s table and the frozen item matrix is that encoder over every item text
    (cached). `hidden_state`: the frozen `llm` reads prompt + completion and every item text.
    report[split] holds the final metrics plus the per-instance 'ranks' and 'index' (`evaluate(keep_ranks)`).

    cot: {split: {instance index: [CoT records]}} (instance indices restart in every split).
    limit: the first `limit` instances of every split, or {split: limit or None}.
    should_stop: polled before every step; when it returns True the training state, the best Rechead so far and
    the loop position are saved under `cfg.checkpoint_dir/stage1_resume` (when set) and `Stopped` is raised. A
    later call with the same settings continues from there and returns what an uninterrupted call returns."""
    from rporec_jax.models.rechead import init_rechead
    from rporec_jax.train.features import item_matrix, rechead_examples
    from rporec_jax.train.hidden_features import hidden_examples, item_hidden_matrix

    mesh = mesh or shd.make_mesh(devices=jax.devices()[:1])
    splits = ("train", *eval_splits)
    limits = limit if isinstance(limit, dict) else {s: limit for s in splits}
    if cot is not None and not set(splits) <= set(cot):
        raise ValueError(f"cot has splits {sorted(cot)}; expected {{split: {{index: records}}}} for {splits}")
    cots = {s: (cot or {}).get(s) for s in splits}
    table = None
    if head.variant == "hidden_state":
        if llm is None:
            raise ValueError("the hidden_state Rechead needs llm=Model (the frozen backbone)")
        examples = {s: hidden_examples(ds, s, llm, cots[s], limits.get(s)) for s in splits}
        items = item_hidden_matrix(llm, ds.item_texts)
    else:
        use = head.variant == "text_fusion"
        examples = {s: rechead_examples(ds, s, encoder, cots[s] if use else None, limit=limits.get(s))
                    for s in splits}
        items = item_matrix(encoder, ds.item_texts)
        # A static encoder seeds the trainable towers with its own table (the reference's setup); a BERT
        # encoder only provides the frozen item matrix and the towers start random.
        if encoder.kind == "static":
            table = shd.to_host(encoder.params["embedding"])
    if head.variant != "hidden_state" and (head.vocab_size, head.dim) != (encoder.config.vocab_size, encoder.dim):
        raise ValueError(f"RecheadConfig(vocab_size={head.vocab_size}, dim={head.dim}) must match the text "
                         f"encoder's (vocab_size={encoder.config.vocab_size}, dim={encoder.dim})")
    params = init_rechead(head, jax.random.key(cfg.seed), {k: v[:2] for k, v in examples["train"].items()},
                          tower_init=table)
    state = stage1_state(head, params, items, cfg.optim, jax.random.key(cfg.seed + 1), mesh, strategy)
    num_items = ds.num_items
    best = {"score": -np.inf, "step": None, "rechead": None}
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state.params["rechead"])
    resume_root = os.path.abspath(os.path.join(cfg.checkpoint_dir, "stage1_resume")) if cfg.checkpoint_dir else None
    fp = _resume.fingerprint(dataclasses.replace(cfg, checkpoint_dir=None), head, eval_splits, eval_config, limits,
                             getattr(ds, "manifest", {}).get("fingerprint"))
    start = None
    if resume_root is not None:
        state, best, start = _load_resume(resume_root, fp, state, best)

    def on_eval(step, st):
        m = evaluate_rechead(st, head, examples["valid"], num_items, mesh, strategy, eval_config)
        score = m[cfg.select_metric]
        if score > best["score"]:  # keep the best Rechead on the host (it is small next to the LLM)
            best.update(score=score, step=step, rechead=shd.to_host(st.params["rechead"]))
        return {f"valid_{k}": v for k, v in m.items()}

    try:
        state, history = fit_stage1(state, head, examples["train"], cfg, mesh,
                                    on_eval if "valid" in examples else None, should_stop=should_stop, start=start)
    except _resume.Stopped as e:
        if resume_root is not None:
            _save_resume(resume_root, fp, e.state, e.loop, best, shardings)
        raise
    report = {"history": history, "best_step": best["step"], f"best_valid_{cfg.select_metric}": best["score"]}
    if best["rechead"] is not None:  # report every split at the best validation step, as selected
        state = state.replace(params={**state.params, "rechead": jax.device_put(best["rechead"], shardings)})
    if cfg.checkpoint_dir:  # the best Rechead, saved once training is over (the resume state holds it before)
        _save_best(cfg, best["step"], best["score"], state.params["rechead"] if best["rechead"] is not None else None)
        _resume.clear(resume_root)
    for s in eval_splits:
        report[s] = evaluate_rechead(state, head, examples[s], num_items, mesh, strategy, eval_config,
                                     keep_ranks=True)
    return state, report


def _best_checkpointer(cfg: Stage1Config):
    """Returns an orbax CheckpointManager keeping only the best Rechead by `cfg.select_metric`."""
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m[cfg.select_metric], best_mode="max")
    return ocp.CheckpointManager(os.path.abspath(os.path.join(cfg.checkpoint_dir, "stage1_rechead")), options=opts)


def _save_best(cfg: Stage1Config, step: Optional[int], score: float, rechead) -> None:
    """Writes `checkpoint_dir/stage1_rechead` holding only the best Rechead (step `step`), sealed; what an
    earlier, unfinished attempt left there is removed first."""
    import orbax.checkpoint as ocp

    from rporec_jax.train.ckpt_integrity import seal

    _resume.clear(os.path.abspath(os.path.join(cfg.checkpoint_dir, "stage1_rechead")))
    if rechead is None:
        return
    with _best_checkpointer(cfg) as manager:
        manager.save(step, args=ocp.args.StandardSave(rechead), metrics={cfg.select_metric: float(score)})
        manager.wait_until_finished()
        if jax.process_index() == 0:
            seal(str(manager.directory))


def _save_resume(root: str, fp: str, state: TrainState, loop: dict, best: dict, shardings) -> None:
    """Saves stage 1's resume state: the train state (Rechead, optimizer, step, key), the best Rechead so far
    and `loop` (position, this epoch's losses, the history)."""
    arrays = {"step": state.step, "rechead": state.params["rechead"], "opt_state": state.opt_state,
              "key": jax.random.key_data(state.key)}
    if best["rechead"] is not None:
        arrays["best_rechead"] = jax.device_put(best["rechead"], shardings)
    meta = {"fingerprint": fp, "loop": loop, "best_score": None if best["rechead"] is None else float(best["score"]),
            "best_step": best["step"]}
    _resume.save(root, int(state.step), arrays, meta)


def _load_resume(root: str, fp: str, state: TrainState, best: dict):
    """Returns (state, best, loop) from the resume state under `root`, or the inputs and None when there is none
    usable (the stage then starts from its beginning)."""
    def like(meta):
        tree = {"step": state.step, "rechead": state.params["rechead"], "opt_state": state.opt_state,
                "key": jax.random.key_data(state.key)}
        if meta["best_score"] is not None:
            tree["best_rechead"] = state.params["rechead"]
        return _resume.abstract(tree)

    got = _resume.load(root, like, fp, "stage 1")
    if got is None:
        return state, best, None
    arrays, meta = got
    state = state.replace(step=arrays["step"], params={**state.params, "rechead": arrays["rechead"]},
                          opt_state=arrays["opt_state"],
                          key=jax.random.wrap_key_data(arrays["key"], impl=jax.random.key_impl(state.key)))
    if meta["best_score"] is not None:
        best = {"score": meta["best_score"], "step": meta["best_step"], "rechead": shd.to_host(arrays["best_rechead"])}
    log.info("stage 1: resumed at step %d (epoch %d)", int(state.step), meta["loop"]["epoch"] + 1)
    return state, best, meta["loop"]


def restore_best_rechead(checkpoint_dir: str, like: dict) -> tuple[int, dict]:
    """Returns (step, Rechead params) of the best stage-1 checkpoint, placed like the pytree `like`."""
    import orbax.checkpoint as ocp

    from rporec_jax.train.ckpt_integrity import newest_intact

    root = os.path.abspath(os.path.join(checkpoint_dir, "stage1_rechead"))
    newest_intact(root)  # only the best is kept: a corrupt one raises CheckpointCorrupt, there is no fallback
    with ocp.CheckpointManager(root) as m:
        step = m.best_step() if m.best_step() is not None else m.latest_step()
        if step is None:
            raise FileNotFoundError(f"{checkpoint_dir}/stage1_rechead holds no checkpoint")
        return step, m.restore(step, args=ocp.args.StandardRestore(like))
