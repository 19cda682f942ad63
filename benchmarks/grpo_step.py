"""One GRPO step (rollout + rewards + update): ours vs TRL's `GRPOTrainer`, same process, model, data, lengths
and CPU threads.

SmolLM2-135M-Instruct in float32 on both sides (TRL reads the HF directory our loader converts the GGUF to, so
the weights are identical); 2 prompts x G 4 samples = 8 rows, prompts of exactly 256 tokens (the chat-templated
prompts of two synthetic-dataset users, cut/repeated to length), 128 sampled new tokens (T 1.0) with end-of-text
disabled on both sides so every row generates all of them. Both sides run the same update: one AdamW step
(lr 1e-6, no weight decay, clip 1.0), clipped surrogate (eps 0.2) + k3 KL to a frozen reference (beta 0.001, so
the reference forward runs), `(r - mean) / (std + 1e-4)` group advantages, sequence-mean of token-mean
aggregation, policy-gradient term on the top-20% entropy tokens.

Rewards: ours is the real stage-2 reward path (parse -> tiny text_fusion Rechead NDCG + length + CoT entropy) with
`w_comp = w_sim = 0` (no summariser generation) and the format gate off; TRL gets a cheap Python reward function.
TRL settings: `loss_type='grpo'`, `top_entropy_quantile=0.2`, `activation_checkpointing=False` (TRL's
`gradient_checkpointing` defaults to True; ours does not recompute layers either), `min_new_tokens` = new tokens
(suppresses EOS); the model directory is a symlinked copy whose config.json names the architecture (TRL 1.16
requires `config.architectures`, which the GGUF-converted config lacks). Its step is timed from
`on_step_begin` to `on_step_end`; its phases come from wrapping `_generate` (rollout) and `_calculate_rewards`
(reward) in a subclass; update = the rest (reference log-probs, policy forward/backward, clipping, AdamW).
The first `--warmup` steps of each side (compilation, allocation) are not timed; medians over `--steps`.

    python benchmarks/grpo_step.py [--steps 3 --warmup 1 --prompts 2 --num-samples 4 --prompt-len 256
                                    --new-tokens 128 --threads N] [--skip-reference]

About 10 minutes on a 2-core CPU with the defaults. Run it on a quiet machine: under oversubscription torch's
multi-threaded decode slows down by an order of magnitude (the output warns when the load average shows it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def progress(msg):
    """Prints a progress line to stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def set_threads(n):
    """Returns the CPU thread count both sides use: pins this process to the first `n` cores it may run on
    (0 = all), before JAX starts its CPU backend, which sizes its thread pool from that mask."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count()
    cores = sorted(os.sched_getaffinity(0))
    if n:
        if n > len(cores):
            raise SystemExit(f"--threads {n}: only {len(cores)} cores available")
        cores = cores[:n]
        os.sched_setaffinity(0, cores)
    return len(cores)


def fixed_length_prompt(tok, messages, n):
    """Returns (text, ids): `messages` chat-templated (generation prompt added) with the last message's content
    cut or repeated so that `tok(text)` is exactly `n` tokens."""
    def render(content):
        return tok.apply_chat_template(messages[:-1] + [{**messages[-1], "content": content}],
                                       add_generation_prompt=True, tokenize=False)

    content = messages[-1]["content"]
    base = len(tok(render(""))["input_ids"])
    if n <= base + 1:
        raise SystemExit(f"--prompt-len {n}: the chat template alone takes {base} tokens")
    body = content
    while len(tok(body)["input_ids"]) < n:
        body += "\n" + content
    body_ids = tok(body)["input_ids"]
    want = n - base
    for cut in sorted(range(max(1, want - 8), want + 9), key=lambda c: abs(c - want)):
        text = render(tok.decode(body_ids[:cut]))
        ids = list(tok(text)["input_ids"])
        if len(ids) == n:
            return text, ids
    raise RuntimeError(f"could not build a prompt of exactly {n} tokens")


def build_world(args, path, mesh, workdir):
    """Returns (model, head, encoder, dataset, prompt messages) for our side: the SmolLM2 policy, a tiny
    text_fusion Rechead over a word-level static encoder, the synthetic dataset."""
    from rporec_jax.data import DataConfig, SyntheticConfig, load_dataset
    from rporec_jax.models import load_model
    from rporec_jax.models.rechead import RecheadConfig, init_rechead
    from rporec_jax.models.tiny import word_static_encoder
    from rporec_jax.train.features import rechead_examples

    model = load_model(path, dtype="float32", mesh=mesh)
    ds = load_dataset(DataConfig(source=SyntheticConfig(num_users=40), num_negatives=49), out_root=workdir)
    builder = ds.prompt_builder(model.tokenizer)
    texts = ds.item_texts[1:] + [ds.manifest["instruction"], builder.user_content([1])]
    enc = word_static_encoder(texts, dim=32)
    head = RecheadConfig(variant="text_fusion", dim=32, vocab_size=enc.config.vocab_size, encoder_layers=1,
                         encoder_heads=4, encoder_ffn=64)
    example = {k: v[:2] for k, v in rechead_examples(ds, "train", enc, limit=2).items()}
    head_params = init_rechead(head, jax.random.key(0), example)
    return model, head, head_params, enc, ds


def run_ours(args, model, head, head_params, enc, ds, mesh, prompts):
    """Returns (per-step metrics of the timed steps) of our GRPOTrainer on `prompts` [(text, ids, content)]."""
    from rporec_jax.grpo_loss import GRPOLossConfig
    from rporec_jax.rewards import RewardConfig
    from rporec_jax.sampling import Sampler
    from rporec_jax.train.features import item_matrix
    from rporec_jax.train.stage1 import stage1_state
    from rporec_jax.train.stage2 import GRPOTrainer, Stage2Config, stage2_state
    from rporec_jax.train.state import OptimConfig

    cfg = Stage2Config(steps=args.warmup + args.steps, batch_size=args.prompts, num_samples=args.num_samples,
                       max_new_tokens=args.new_tokens, temperature=1.0, prompt_buckets=(args.prompt_len,),
                       reward=RewardConfig(format_gate=False, w_comp=0.0, w_sim=0.0), loss=GRPOLossConfig(beta=0.001),
                       optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0), length_bucket=args.new_tokens,
                       logprob_chunk=128, assume_think_open=True)
    items = item_matrix(enc, ds.item_texts, use_cache=False)
    s1 = stage1_state(head, head_params, items, OptimConfig(), jax.random.key(2), mesh)
    state = stage2_state(s1, model.params, cfg.optim)
    trainer = GRPOTrainer(model, head, enc, ds, cfg, mesh, limit=args.prompts)
    trainer.prompt_ids = [ids for _, ids, _ in prompts]
    trainer.prompt_texts = [content for _, _, content in prompts]
    trainer.sampler = Sampler(model, cfg.sampling(), stop_ids=[-1])  # no stop id: every row samples all tokens
    timed = []
    for step in range(cfg.steps):
        state, metrics, _ = trainer.step(state, step)
        progress(f"ours step {step}: {metrics['time/step']:.2f} s (rollout {metrics['time/rollout']:.2f}, reward "
                 f"{metrics['time/reward']:.3f}, update {metrics['time/update']:.2f})")
        if step >= args.warmup:
            timed.append(metrics)
    jax.block_until_ready(state.params)
    return timed


def trl_model_dir(hf_dir, workdir):
    """Returns a copy of the HF dir (files symlinked) whose config.json names its architecture: TRL 1.16's
    `create_model_from_path` reads `config.architectures[0]`, which a GGUF-converted config lacks."""
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("architectures"):
        return hf_dir
    out = os.path.join(workdir, "trl_model")
    os.makedirs(out)
    for name in os.listdir(hf_dir):
        if name != "config.json":
            os.symlink(os.path.abspath(hf_dir / name), os.path.join(out, name))
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out


def run_trl(args, hf_dir, prompts, workdir):
    """Returns per-step dicts (step, rollout, reward, update seconds, completion tokens, mean completion length,
    torch threads) of TRL's GRPOTrainer on the same prompts, timed steps only."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir = trl_model_dir(Path(hf_dir), workdir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for text, ids, _ in prompts:
        if list(tok(text)["input_ids"]) != ids:
            raise RuntimeError("TRL's tokenizer encodes the prompt text differently from ours")

    log = {"rollout": [], "reward": [], "lengths": [], "tokens": []}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    # float32 matmuls in TF32 on a GPU, as JAX does there by default (torch's default is full float32)
    torch.backends.cuda.matmul.allow_tf32 = True

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts_):
            t = time.perf_counter()
            out = super()._generate(prompts_)
            log["rollout"].append(time.perf_counter() - t)
            lens = [len(c) for c in out[1]]  # completion_ids_list
            log["lengths"].append(float(np.mean(lens)))
            log["tokens"].append(int(np.sum(lens)))
            return out

        def _calculate_rewards(self, *a, **kw):
            t = time.perf_counter()
            out = super()._calculate_rewards(*a, **kw)
            log["reward"].append(time.perf_counter() - t)
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.steps, self.threads = None, [], []

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            self.steps.append(time.perf_counter() - self.t0)
            k = len(self.steps) - 1
            progress(f"trl step {k}: {self.steps[-1]:.2f} s (rollout {log['rollout'][k]:.2f}, reward "
                     f"{log['reward'][k]:.3f})")
            self.threads.append(torch.get_num_threads())

    def length_reward(completions, **kw):
        return [-abs(len(c) - 300) / 300.0 for c in completions]

    n = args.new_tokens
    # transformers renamed `gradient_checkpointing` to `activation_checkpointing` during v5
    ckpt_arg = "activation_checkpointing" if "activation_checkpointing" in {
        f.name for f in dataclasses.fields(GRPOConfig)} else "gradient_checkpointing"
    config = GRPOConfig(
        output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=args.prompts * args.num_samples,
        num_generations=args.num_samples, max_completion_length=n, max_steps=args.warmup + args.steps,
        learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant", beta=0.001,
        epsilon=0.2, loss_type="grpo", scale_rewards="group", top_entropy_quantile=0.2, num_iterations=1,
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": n},
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), **{ckpt_arg: False},
        gradient_accumulation_steps=1, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_pin_memory=False, shuffle_dataset=False, seed=0,
        model_init_kwargs={"dtype": "float32"})
    data = Dataset.from_dict({"prompt": [text for text, _, _ in prompts]})
    timer = StepTimer()
    trainer = TimedGRPOTrainer(model=str(model_dir), reward_funcs=length_reward, args=config, train_dataset=data,
                               processing_class=tok, callbacks=[timer])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    ckpt = getattr(trainer.model, "is_activation_checkpointing", None)
    if ckpt is None:  # transformers < 5 names it after gradients
        ckpt = getattr(trainer.model, "is_gradient_checkpointing", False)
    if getattr(trainer.args, ckpt_arg) or ckpt:
        raise RuntimeError("TRL's activation checkpointing is on; the comparison assumes it off")
    trainer.train()
    rows = []
    for k in range(args.warmup, len(timer.steps)):
        s = timer.steps[k]
        rows.append({"step": s, "rollout": log["rollout"][k], "reward": log["reward"][k],
                     "update": s - log["rollout"][k] - log["reward"][k], "tokens": log["tokens"][k],
                     "length": log["lengths"][k], "threads": timer.threads[k]})
    return rows


def main():
    from rporec_jax.models.__main__ import default_model_path
    from rporec_jax.models.loading import gguf_to_hf_dir
    from rporec_jax.sharding import make_mesh

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per side (compilation)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=4, help="G")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for both sides: pins the process to that many cores (XLA sizes its pool "
                         "from the affinity mask) and sets torch's thread count (default: all cores)")
    ap.add_argument("--skip-reference", action="store_true", help="only run ours (e.g. on TPU)")
    args = ap.parse_args()
    threads = set_threads(args.threads)

    path = args.model or default_model_path()
    hf_dir = gguf_to_hf_dir(path) if str(path).endswith(".gguf") else path
    mesh = make_mesh(devices=jax.devices()[:1])
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as workdir:
        model, head, head_params, enc, ds = build_world(args, hf_dir, mesh, workdir)
        builder = ds.prompt_builder(model.tokenizer)
        recs = [r for _, r in zip(range(args.prompts), ds.records("train"))]
        prompts = []
        for r in recs:
            msgs = builder.messages([h for h in r["history"] if h])
            text, ids = fixed_length_prompt(model.tokenizer, msgs, args.prompt_len)
            prompts.append((text, ids, builder.user_content([h for h in r["history"] if h])))

        load = [os.getloadavg()[0]]
        ours = run_ours(args, model, head, head_params, enc, ds, mesh, prompts)
        load.append(os.getloadavg()[0])
        rows = [("rporec_jax", [m["time/step"] for m in ours], [m["time/rollout"] for m in ours],
                 [m["time/reward"] for m in ours], [m["time/update"] for m in ours], [m["tokens"] for m in ours],
                 [m["completion_length"] for m in ours])]
        torch_threads = ""
        if not args.skip_reference:
            import torch

            torch.set_num_threads(threads)
            ref = run_trl(args, hf_dir, prompts, workdir)
            load.append(os.getloadavg()[0])
            rows.append((f"trl {__import__('trl').__version__}", [r["step"] for r in ref],
                         [r["rollout"] for r in ref], [r["reward"] for r in ref], [r["update"] for r in ref],
                         [r["tokens"] for r in ref], [r["length"] for r in ref]))
            torch_threads = f" (torch: {'/'.join(str(t) for t in sorted({r['threads'] for r in ref}))})"

    med = statistics.median
    d = jax.devices()[0]
    c = model.config
    print(f"device: {d.platform} ({d.device_kind}), {threads} CPU threads{torch_threads}; model {c.model_type} "
          f"{c.num_layers}L/{c.hidden_size}d float32; {args.prompts} prompts x G {args.num_samples}, prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens (no early stop), T 1.0; beta 0.001; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"1-min load average at start / after ours{' / after TRL' if len(load) > 2 else ''}: "
          f"{' / '.join(f'{x:.1f}' for x in load)} "
          f"(above the CPU count means other processes shared the cores)")
    if max(load) > (os.cpu_count() or 1) + 1:
        print("WARNING: other processes shared the cores during this run; with more than one thread, torch's "
              "OpenMP decode (many small parallel regions) slows down far more than XLA under oversubscription, "
              "so the numbers are not clean-machine numbers: rerun on a quiet machine"
              + (" (or with --threads 1)" if threads > 1 else ""))
    print("rewards: ours = Rechead NDCG + length + CoT entropy (w_comp = w_sim = 0, format gate off)"
          + ("; TRL = a Python length reward" if len(rows) == 2 else ""))
    print(f"{'side':<14}{'step s':>9}{'rollout':>9}{'reward':>9}{'update':>9}{'tokens/s':>10}{'compl. len':>12}")
    for name, step, roll, rew, upd, toks, lens in rows:
        print(f"{name:<14}{med(step):>9.2f}{med(roll):>9.2f}{med(rew):>9.3f}{med(upd):>9.2f}"
              f"{med(toks) / med(step):>10.1f}{med(lens):>12.1f}")
    if len(rows) == 2:
        o, r = rows
        print(f"ratio TRL/ours (our speedup): step {med(r[1]) / med(o[1]):.2f}x, rollout "
              f"{med(r[2]) / med(o[2]):.2f}x, update {med(r[4]) / med(o[4]):.2f}x")


if __name__ == "__main__":
    main()
