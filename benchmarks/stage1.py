"""Stage-1 throughput: text_fusion Rechead training examples/s and full-ranking eval users/s, ours vs a
PyTorch implementation of the same equations (tests/torch_rechead.py), same sizes and CPU threads, one run.

ML-100K-sized defaults: 1,682 items, batch 128, 49 negatives, prompt/CoT/answer of 512/256/64 tower tokens,
MiniLM-sized towers (vocab 30,522, dim 384), 4-layer encoder (8 heads, FFN 2048), AdamW.

    python benchmarks/stage1.py [--steps 20 --dim 384 --batch 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def make_batch(rng, b, vocab, items, k, lens=(512, 256, 64)):
    """Returns one synthetic stage-1 batch (NumPy) with realistic padding."""
    out = {}
    for name, n in zip(("prompt", "cot", "answer"), lens):
        out[f"{name}_ids"] = rng.integers(0, vocab, (b, n)).astype(np.int32)
        out[f"{name}_mask"] = np.arange(n)[None] < rng.integers(n // 2, n + 1, b)[:, None]
    out["format"] = rng.integers(0, 2, b).astype(np.int32)
    out["target"] = rng.integers(1, items + 1, b).astype(np.int32)
    out["negatives"] = rng.integers(1, items + 1, (b, k)).astype(np.int32)
    return out


def timed(fn, n):
    """Returns the median seconds of `n` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_ours(args, batch, items):
    """Returns (train seconds/step, eval seconds/batch) for our jitted stage-1 step and full ranking."""
    from rporec_jax.models.rechead import RecheadConfig, init_rechead
    from rporec_jax.train.stage1 import make_stage1_step, stage1_state, user_vectors
    from rporec_jax.train.state import OptimConfig

    head = RecheadConfig(dim=args.dim, vocab_size=args.vocab)
    params = init_rechead(head, jax.random.key(0), {k: v[:2] for k, v in batch.items()})
    state = stage1_state(head, params, items, OptimConfig(lr=1e-3), jax.random.key(1))
    step = make_stage1_step(head, state)
    holder = {"state": state}

    def train():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    @jax.jit
    def ranks(params, b):
        u = user_vectors(head, params, b)
        scores = u @ params["items"].T
        scores = scores.at[:, 0].set(-jnp.inf)
        tgt = jnp.take_along_axis(scores, b["target"][:, None], 1)
        return 1 + jnp.sum(scores > tgt, axis=1)

    def evaluate():
        jax.block_until_ready(ranks(holder["state"].params, batch))

    return timed(train, args.steps), timed(evaluate, args.steps)


def run_torch(args, batch, items):
    """Returns (train seconds/step, eval seconds/batch) for the PyTorch re-implementation."""
    import torch
    from torch_rechead import TorchTextFusion

    torch.set_num_threads(os.cpu_count())
    model = TorchTextFusion(args.vocab, args.dim, args.dim, 4, 8, 2048)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    tb = {k: torch.as_tensor(np.array(v)) for k, v in batch.items()}
    v = torch.as_tensor(items)
    cand = torch.cat([tb["target"][:, None], tb["negatives"]], 1).long()

    def train():
        model.train()
        u = model(tb)
        logits = torch.einsum("bd,bkd->bk", u, v[cand])
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def evaluate():
        model.eval()
        with torch.no_grad():
            scores = model(tb) @ v.T
            scores[:, 0] = -float("inf")
            tgt = scores.gather(1, tb["target"][:, None].long())
            (1 + (scores > tgt).sum(1)).numpy()

    return timed(train, args.steps), timed(evaluate, args.steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--items", type=int, default=1682)
    ap.add_argument("--negatives", type=int, default=49)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    batch = make_batch(rng, args.batch, args.vocab, args.items, args.negatives)
    items = rng.normal(size=(args.items + 1, args.dim)).astype(np.float32)
    items[0] = 0
    rows = [("rporec_jax", *run_ours(args, batch, items))]
    if not args.skip_reference:
        rows.append(("pytorch", *run_torch(args, batch, items)))
    d = jax.devices()[0]
    print(f"device: {d.platform} ({d.device_kind}), {os.cpu_count()} CPU threads; text_fusion dim {args.dim}, "
          f"vocab {args.vocab}, batch {args.batch}, K {args.negatives}, {args.items} items; median of {args.steps}")
    print(f"{'impl':<12}{'train ex/s':>12}{'eval users/s':>14}")
    for name, tr, ev in rows:
        print(f"{name:<12}{args.batch / tr:>12.1f}{args.batch / ev:>14.1f}")
    if len(rows) == 2:
        print(f"ratio ours/pytorch: train {rows[1][1] / rows[0][1]:.2f}x, eval {rows[1][2] / rows[0][2]:.2f}x")


if __name__ == "__main__":
    main()
