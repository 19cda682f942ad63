"""Sampler throughput: ours vs transformers `generate` (PyTorch) on SmolLM2-135M-Instruct, same process.

Greedy (or, with `--top-p`, sampled at temperature 1 with that nucleus: the CoT setting), batch 8, prompt 256
tokens, 128 new tokens (no early stop: stop ids are disabled on both sides),
same CPU threads; on a GPU both sides run on it, float32 matmuls in TF32 on both (JAX's default there).
Prints end-to-end tokens/s of both, the ratio, and decode-only tokens/s (a run with one new token is
subtracted, removing prefill) against the roofline floor: bytes read per decode step
(weights + average KV cache) over the measured memory bandwidth.

    python benchmarks/sampler.py [--batch 8 --prompt-len 256 --new-tokens 128 --repeats 3 --top-p 0.95]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Returns the median read bandwidth (GB/s) of a jitted full reduction over an `nbytes` float32 array."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def run_ours(model, prompts, new_tokens, repeats, top_p):
    """Returns (median seconds per generate call, generated token ids [batch, new])."""
    from rporec_jax.sampling import Sampler, SamplingConfig

    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0 if top_p else 0.0, top_p=top_p or 1.0,
                         prompt_buckets=(prompts.shape[1],))
    sampler = Sampler(model, cfg, stop_ids=[-1])  # no stop: every row decodes all new tokens
    out = sampler.generate(list(prompts), jax.random.key(0))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = sampler.generate(list(prompts), jax.random.key(0))
        times.append(time.perf_counter() - t)
    return statistics.median(times), out.tokens


def decode_rate(run, batch, new_tokens):
    """Returns (end-to-end seconds, decode-only tokens/s, tokens) from `run(n) -> (seconds, tokens)`."""
    total, tokens = run(new_tokens)
    prefill, _ = run(1)
    return total, batch * (new_tokens - 1) / max(total - prefill, 1e-9), tokens


def load_reference(path, dtype):
    """Returns transformers' model read from the same GGUF or HF dir, on the GPU when torch sees one."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=getattr(torch, dtype))
    if str(path).endswith(".gguf"):
        path, kw["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    return model.to("cuda") if torch.cuda.is_available() else model


def run_transformers(ref, prompts, new_tokens, repeats, top_p):
    """Returns (median seconds per generate call, generated token ids) for transformers `generate`."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long, device=ref.device)
    sync = torch.cuda.synchronize if ref.device.type == "cuda" else (lambda: None)
    sampling = dict(do_sample=True, temperature=1.0, top_p=top_p, top_k=0) if top_p else dict(do_sample=False)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=0, **sampling)
    with torch.no_grad():
        ref.generate(ids, **kw)  # warm-up
        times, gen = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            gen = ref.generate(ids, **kw)
            sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times), gen[:, ids.shape[1]:].cpu().numpy()


def main():
    from rporec_jax.models import load_model
    from rporec_jax.models.__main__ import default_model_path
    from rporec_jax.sharding import make_mesh

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF dir or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top-p", type=float, default=0.0,
                    help="sample at temperature 1 with this nucleus on both sides (0: greedy)")
    ap.add_argument("--skip-reference", action="store_true", help="only run ours (e.g. on TPU)")
    ap.add_argument("--scan-unroll", type=int, default=1,
                    help="layers per layer-scan iteration (num_layers = no layer loop; see DecoderConfig)")
    args = ap.parse_args()

    path = args.model or default_model_path()
    model = load_model(path, dtype=args.dtype, mesh=make_mesh(devices=jax.devices()[:1]), scan_unroll=args.scan_unroll)
    c = model.config
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, c.vocab_size - 100, (args.batch, args.prompt_len)).astype(np.int32)
    new = args.batch * args.new_tokens

    ours_s, ours_decode, ours_tokens = decode_rate(lambda n: run_ours(model, prompts, n, args.repeats, args.top_p),
                                                   args.batch, args.new_tokens)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    kv_bytes = 2 * c.num_layers * args.batch * (args.prompt_len + args.new_tokens) * c.num_kv_heads * c.head_dim \
        * jnp.dtype(c.compute_dtype).itemsize
    step_bytes = weight_bytes + kv_bytes / 2  # the cache is on average half full during decoding
    bw = measure_bandwidth_gbs()
    floor_tps = args.batch / (step_bytes / (bw * 1e9))

    device = jax.devices()[0]
    rows = [("rporec_jax", ours_s, new / ours_s, ours_decode)]
    if not args.skip_reference:
        import torch

        torch.set_num_threads(os.cpu_count())
        # float32 matmuls in TF32 on both sides on a GPU: JAX's default there; torch's default is full float32
        torch.backends.cuda.matmul.allow_tf32 = True
        ref = load_reference(path, args.dtype)
        ref_s, ref_decode, ref_tokens = decode_rate(
            lambda n: run_transformers(ref, prompts, n, args.repeats, args.top_p),
                                                    args.batch, args.new_tokens)
        rows.append((f"transformers/{ref.device.type}", ref_s, new / ref_s, ref_decode))
        agree = float((ours_tokens == ref_tokens).mean())
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPU threads; model {c.model_type} "
          f"{c.num_layers}L/{c.hidden_size}d {args.dtype}; batch {args.batch}, prompt {args.prompt_len}, "
          f"new {args.new_tokens}, {f'top-p {args.top_p} T 1' if args.top_p else 'greedy'}; "
          f"layer scan unroll {args.scan_unroll}; median of {args.repeats}")
    print(f"{'impl':<18}{'s/call':>10}{'tok/s':>10}{'decode tok/s':>14}")
    for name, s, tps, dec in rows:
        print(f"{name:<18}{s:>10.2f}{tps:>10.1f}{dec:>14.1f}")
    if not args.skip_reference:
        print(f"ratio ours/transformers: {rows[0][2] / rows[1][2]:.2f}x end-to-end, {rows[0][3] / rows[1][3]:.2f}x "
              f"decode"
              + ("" if args.top_p else f"   (greedy tokens agree: {agree:.1%})"))
    print(f"roofline floor: {step_bytes / 2**20:.0f} MiB read per decode step at {bw:.1f} GB/s -> "
          f"{floor_tps:.1f} decode tok/s; ours is {floor_tps / rows[0][3]:.2f}x from the floor")


if __name__ == "__main__":
    main()
