"""`python -m rporec_jax.launch`: run the pipeline from a config, resume it, export or query its model.

    python -m rporec_jax.launch                                   # configs/demo.py end to end
    python -m rporec_jax.launch --config synthetic --set stage2.steps=20 --run_dir runs/s1
    python -m rporec_jax.launch --run_dir runs/s1 --resume        # after a preemption or Ctrl-C
    python -m rporec_jax.launch export --run_dir runs/s1 --out tuned_hf_dir
    python -m rporec_jax.launch recommend --run_dir runs/s1 --user 12
    python -m rporec_jax.launch plan --config amazon_video_games --topology v5e-8 --set mesh_preset=tpu-v5e-8

SIGTERM/SIGINT finish the current step, save and exit with status 3 ("resume me"); a NaN/Inf stops with
status 2 and keeps the last good checkpoint; a bad config or path fails before any heavy work with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rporec_jax.launch", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=("run", "export", "recommend", "plan"))
    ap.add_argument("--config", default=None, help="configs/NAME.py name or a path (default: demo; with --resume: "
                                                   "the run's saved config)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field "
                    "(dotted path, repeatable), e.g. --set stage2.loss.beta=0.01")
    ap.add_argument("--stages", default=None, help="comma list among cot,stage1,stage2,eval")
    ap.add_argument("--run_dir", default=None, help="run directory (default: runs/<config name>-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run_dir")
    ap.add_argument("--out", default=None, help="export: output HF model directory; plan: where plan.json/.md go "
                                                "(default: --run_dir, else plans/<config>-<topology>)")
    ap.add_argument("--topology", default=None, help="plan: v5e-8, v4-32, v5p-64, v6e-8, ... or a jax topology "
                                                     "string such as v5e:2x2")
    ap.add_argument("--items", type=int, default=None, help="plan: catalogue size (default: nominal per source)")
    ap.add_argument("--programs", default=None, help="plan: comma list of programs to compile (default: all)")
    ap.add_argument("--user", type=int, default=None, help="recommend: user id")
    ap.add_argument("--split", default="test", help="recommend: the split whose instance of --user is used")
    ap.add_argument("--no_progress", action="store_true", help="no progress bars (log files stay)")
    ap.add_argument("--no_preflight", action="store_true", help="on accelerators, skip compiling the samplers "
                    "and the GRPO update before any stage to check that they fit")
    return ap


def resolve_config(args) -> tuple:
    """Returns (validated RunConfig, run_dir) from the arguments; raises ConfigError/FileNotFoundError early."""
    from rporec_jax import config as C

    overrides = list(args.set)
    if args.stages:
        overrides.append(f"stages={args.stages}")
    if args.resume or args.command != "run":
        if not args.run_dir:
            raise C.ConfigError(f"{'--resume' if args.resume else args.command} needs --run_dir")
        saved = Path(args.run_dir) / "config.json"
        if not saved.exists():
            raise FileNotFoundError(f"{saved} does not exist; is {args.run_dir} a run directory?")
        base = C.load_config(args.config) if args.config else C.from_dict(json.loads(saved.read_text()))
        cfg = C.apply_overrides(base, overrides)
        run_dir = args.run_dir
    else:
        cfg = C.load_config(args.config or "demo", overrides)
        run_dir = args.run_dir or str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    C.validate(cfg)
    # the paths are checked now, before the data or any model is touched and before the run dir is written
    C.check_paths(cfg)
    return cfg, run_dir


def check_devices(cfg) -> None:
    """Raises ValueError when the mesh does not fit the devices JAX sees (after `distributed.initialize`)."""
    import jax

    try:
        cfg.mesh.resolve(jax.device_count())
    except ValueError as e:
        raise ValueError(f"{e} ({jax.device_count()} x {jax.devices()[0].device_kind}); set mesh.data/fsdp/tp to "
                         f"fit them (one may be -1: all remaining devices) or choose a mesh_preset") from None


class StopFlag:
    """Set by SIGTERM/SIGINT; a second signal exits at once."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> dict:
        """Installs the handler for SIGTERM and SIGINT; returns the previous handlers (for `restore`)."""
        def handler(signum, _frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n[launch] {signal.Signals(signum).name}: finishing the current step, then saving "
                  "(send again to abort)", file=sys.stderr, flush=True)
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    @staticmethod
    def restore(previous: dict) -> None:
        for sig, h in previous.items():
            signal.signal(sig, h)


def main(argv=None) -> int:
    """Runs the command line; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar in the stages honours it
    from rporec_jax import config as C
    from rporec_jax import distributed

    if args.command == "plan":
        return plan(args)
    try:
        cfg, run_dir = resolve_config(args)
    except (C.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"[launch] error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    distributed.initialize(cfg.distributed)
    try:
        check_devices(cfg)
    except ValueError as e:
        print(f"[launch] error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from rporec_jax.pipeline import RunDirError

    if args.command in ("export", "recommend"):
        try:
            if args.command == "export":
                return export(cfg, run_dir, args.out)
            return recommend(cfg, run_dir, args.user, args.split)
        except (C.ConfigError, RunDirError, FileNotFoundError, ValueError) as e:
            print(f"[launch] error: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_BAD_INPUT

    if not args.no_preflight:
        from rporec_jax import plan as PL
        from rporec_jax import sharding as shd

        problems = PL.preflight(cfg, shd.make_mesh(cfg.mesh))  # a no-op on CPU hosts
        if problems:
            print("[launch] will not fit, stopped before any heavy stage:\n  " + "\n  ".join(problems),
                  file=sys.stderr)
            return EXIT_BAD_INPUT
    stop = StopFlag()
    previous = stop.install()
    try:
        return _run(cfg, run_dir, args, stop)
    finally:
        stop.restore(previous)


def _run(cfg, run_dir: str, args, stop: StopFlag) -> int:
    """Runs the pipeline in `run_dir`; returns the exit status. An error raised inside a stage prints one line
    (the traceback goes to run.log) and returns 1."""
    from rporec_jax import config as C
    from rporec_jax import distributed
    from rporec_jax.pipeline import Interrupted, Pipeline, RunDirError

    try:
        pipe = Pipeline(cfg, run_dir, resume=args.resume, should_stop=stop, progress=not args.no_progress)
    except (C.ConfigError, OSError, ValueError, RunDirError) as e:  # OSError: a missing/existing dir, permissions
        print(f"[launch] error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    say = print if distributed.is_primary() else (lambda *a, **k: None)  # one voice on a multi-process run
    say(f"[launch] run {run_dir}: stages {','.join(cfg.stages)}", flush=True)
    try:
        pipe.run()
    except Interrupted as e:
        print(f"[launch] stopped in {e}; state saved. Continue with:\n  python -m rporec_jax.launch --run_dir "
              f"{run_dir} --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as e:
        print(f"[launch] non-finite value: {e}\n  the last good checkpoint in {run_dir}/ckpt is kept",
              file=sys.stderr)
        return EXIT_NONFINITE
    except Exception as e:  # noqa: BLE001 -- bad data, a model that does not load, a bug: one line, exit 1
        where = pipe.record_error(e)
        hint = "" if pipe.started() else "; no stage had begun: fix it and launch again, with or without --resume"
        print(f"[launch] error in {where} (traceback in {Path(run_dir) / 'run.log'}{hint})", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        pipe.close()
    say(f"[launch] report: {Path(run_dir) / 'report.md'}", flush=True)
    return 0


def plan(args) -> int:
    """Compiles every program of the run for `--topology` on this host and writes plan.json/plan.md; returns 0
    when every program fits the chips' HBM, 1 when one does not or the plan cannot be made."""
    from rporec_jax import config as C
    from rporec_jax import plan as PL

    try:
        if not args.topology:
            raise PL.PlanError(f"plan needs --topology: one of {', '.join(PL.TOPOLOGIES)} or a jax topology string")
        overrides = list(args.set) + ([f"stages={args.stages}"] if args.stages else [])
        cfg = C.load_config(args.config or "demo", overrides)
        C.validate(cfg)
        devices = PL.topology_devices(args.topology)  # before anything slow: a bad name or no libtpu fails now
        print(f"[plan] {cfg.name} on {args.topology}: {len(devices)} {devices[0].device_kind} devices, "
              f"{len({d.process_index for d in devices})} host(s)", flush=True)
        programs = args.programs.split(",") if args.programs else None
        report = PL.plan(cfg, args.topology, num_items=args.items, programs=programs,
                         log=lambda s: print(f"[plan] {s}", flush=True))
    except (C.ConfigError, PL.PlanError, ValueError) as e:
        print(f"[plan] error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = args.out or args.run_dir or str(Path("plans") / f"{cfg.name}-{args.topology.replace(':', '_')}")
    paths = PL.write(report, out)
    print(PL.markdown(report))
    print(f"[plan] written: {paths[0]}, {paths[1]}")
    if not report["fits"]:
        bad = [r["program"] for r in report["rows"] if not r["fits"]]
        print(f"[plan] does not fit: {', '.join(bad)} (see the largest buffers above)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def export(cfg, run_dir: str, out: str) -> int:
    """Writes the tuned backbone (latest stage-2 checkpoint) as an HF model directory at `out` (the run
    directory is only read)."""
    import dataclasses

    from rporec_jax.models import save_model
    from rporec_jax.pipeline import Pipeline

    if not out:
        print("[launch] export needs --out DIR", file=sys.stderr)
        return EXIT_BAD_INPUT
    pipe = Pipeline(cfg, run_dir, read_only=True, progress=False)
    state = pipe.restore_stage2()
    model = dataclasses.replace(pipe.parts.model, params=state.params["policy"])
    path = save_model(model, out)
    print(f"[launch] tuned backbone (step {int(state.step)}) written to {path}")
    return 0


def recommend(cfg, run_dir: str, user: int, split: str) -> int:
    """Prints the tuned policy's reasoning and the Rechead's top-10 items for `user`'s instance in `split` (the
    run directory is only read)."""
    import dataclasses

    import jax
    import numpy as np

    from rporec_jax.data.parser import parse_output
    from rporec_jax.pipeline import Pipeline
    from rporec_jax.sampling import Sampler, SamplingConfig
    from rporec_jax.train.rollout_scoring import RolloutScorer

    if user is None:
        print("[launch] recommend needs --user ID", file=sys.stderr)
        return EXIT_BAD_INPUT
    pipe = Pipeline(cfg, run_dir, read_only=True, progress=False)
    p = pipe.build()
    rec = next((r for r in p.ds.records(split) if r["user"] == user), None)
    if rec is None:
        print(f"[launch] user {user} has no instance in the {split} split", file=sys.stderr)
        return EXIT_BAD_INPUT
    done = pipe.progress_state["done"]
    state = pipe.restore_stage2() if "stage2" in done else pipe.restore_stage1()
    params = state.params.get("policy", p.model.params)
    builder = p.ds.prompt_builder(p.model.tokenizer)
    hist = [h for h in rec["history"] if h]
    ids = builder.encode([hist])[0][0]
    s2 = cfg.stage2
    out = Sampler(p.model, SamplingConfig(max_new_tokens=s2.max_new_tokens, temperature=0.0,
                                          prompt_buckets=s2.prompt_buckets, force=s2.force_format)).generate(
        [ids], jax.random.key(0), params)
    parsed = [parse_output(out.texts[0], s2.assume_think_open)]
    scorer = RolloutScorer(p.model, p.head, p.encoder, p.ds.num_items,
                           dataclasses.replace(s2.reward, ranking="full"), p.mesh, s2.assume_think_open)
    inputs = scorer.rechead_inputs([builder.user_content(hist)], [ids], out, parsed, state.params)
    scores = scorer.scores(state.params, inputs, np.asarray([rec["target"]]), np.zeros((1, 0), np.int32))[0]
    scores[0] = -np.inf
    top = np.argsort(-scores)[:10]
    print(f"user {user} ({split} instance {rec['index']}), {len(hist)} history items; model: "
          f"{'stage 2' if 'stage2' in done else 'stage 1 (untuned backbone)'}\n")
    print("reasoning:\n" + out.texts[0].strip() + "\n")
    print("top-10:")
    for k, i in enumerate(top, 1):
        mark = "  <- held-out next item" if int(i) == rec["target"] else ""
        print(f"{k:2d}. [{i}] {p.ds.item_texts[i][:100]}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
