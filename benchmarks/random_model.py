"""Writes an HF model dir with a real model's config and tokenizer but random weights (torch init, seed 0).

For timing on a machine that cannot receive the real weights (an air-gapped accelerator, a size-capped
transfer): throughput does not depend on the weights' values when every benchmark disables early stopping.

    python benchmarks/random_model.py OUT_DIR [--like HF_DIR_OR_GGUF]   # default: SmolLM2-135M-Instruct GGUF
"""

from __future__ import annotations

import argparse
import os
import shutil


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--like", default=None, help="HF dir (config + tokenizer suffice) or .gguf")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    like = args.like
    if like is None or like.endswith(".gguf"):
        from rporec_jax.models.__main__ import default_model_path
        from rporec_jax.models.loading import gguf_to_hf_dir

        like = str(gguf_to_hf_dir(like or default_model_path()))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    model.save_pretrained(args.out)
    for name in os.listdir(like):  # tokenizer and chat template
        if name not in ("config.json", "generation_config.json") and not name.endswith(".safetensors"):
            shutil.copy(os.path.join(like, name), args.out)
    print(f"{args.out}: random {model.config.model_type} weights, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
