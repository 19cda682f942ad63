"""Our decoder vs transformers on the same weights, on whatever device each framework finds (e.g. both on one
GPU): max |logit difference| / max |logit| in full float32 and with each side's fast default (TF32 on GPUs).

    python benchmarks/parity.py [--model HF_DIR_OR_GGUF]   # default: SmolLM2-135M-Instruct GGUF
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from sampler import load_reference  # the same transformers model, on the GPU when torch sees one


def main():
    from rporec_jax.models import load_model
    from rporec_jax.models.__main__ import default_model_path
    from rporec_jax.sharding import make_mesh

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    import torch

    path = args.model or default_model_path()
    ref = load_reference(path, "float32")
    dev = ref.device
    ours = load_model(path, dtype="float32", mesh=make_mesh(devices=jax.devices()[:1]))
    ids = np.random.default_rng(1).integers(100, ours.config.vocab_size - 100, (2, 128)).astype(np.int32)
    print(f"ours on {jax.devices()[0].device_kind}, transformers on {dev}; 2 x 128 random token ids")
    for mode in ("highest", "default"):
        torch.backends.cuda.matmul.allow_tf32 = mode == "default"
        with torch.no_grad():
            want = ref(torch.as_tensor(ids, dtype=torch.long, device=dev)).logits.float().cpu().numpy()
        with jax.default_matmul_precision("highest" if mode == "highest" else None):
            got = np.asarray(ours.apply(ours.params, ids))
        err = np.abs(got - want).max() / np.abs(want).max()
        agree = (got.argmax(-1) == want.argmax(-1)).mean()
        print(f"matmul precision {mode:8s}: max|ours - transformers| / max|transformers| = {err:.2e}; "
              f"argmax agrees on {agree:.1%} of positions")


if __name__ == "__main__":
    main()
