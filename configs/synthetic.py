"""Seconds-scale smoke run of every stage, no downloads: synthetic shop data, a randomly initialised tiny decoder
with the tiny word-level chat tokenizer (backbone.path='tiny-random') and a random static word tower
(encoder.path='tiny-random', width rechead.dim). Numbers it reports mean nothing; it exercises the code paths."""

from rporec_jax.config import (
    TINY_RANDOM,
    CheckpointConfig,
    EncoderConfig,
    EvalRunConfig,
    LimitsConfig,
    ModelConfig,
    RunConfig,
)
from rporec_jax.data import DataConfig, PromptConfig, SplitConfig, SyntheticConfig
from rporec_jax.models.rechead import RecheadConfig
from rporec_jax.rewards import RewardConfig
from rporec_jax.train.cot import CoTConfig
from rporec_jax.train.stage1 import Stage1Config
from rporec_jax.train.stage2 import Stage2Config
from rporec_jax.train.state import OptimConfig

BUCKETS = (256,)  # one prompt shape: one compile per sampler program


def config() -> RunConfig:
    return RunConfig(
        name="synthetic",
        data=DataConfig(source=SyntheticConfig(num_users=60, seed=0), split=SplitConfig(window=6),
                        prompt=PromptConfig(max_prompt_tokens=256), num_negatives=20),
        backbone=ModelConfig(path=TINY_RANDOM, dtype="float32"),
        encoder=EncoderConfig(path=TINY_RANDOM, kind="static"),
        # The untrained tiny model never writes the tags: its text is read as an open <think> (all CoT), so
        # the Rechead's CoT tower and the GRPO rewards have something to read.
        cot=CoTConfig(max_new_tokens=24, batch_size=8, shard_size=64, prompt_buckets=BUCKETS,
                      teacher_dtype="float32", assume_think_open=True),
        rechead=RecheadConfig(variant="text_fusion", dim=32, vocab_size=0, encoder_layers=2, encoder_heads=4,
                              encoder_ffn=64),
        stage1=Stage1Config(batch_size=32, epochs=10, optim=OptimConfig(lr=1e-2, total_steps=40), log_every=4),
        stage2=Stage2Config(
            steps=6, batch_size=2, num_samples=4, max_new_tokens=24, prompt_buckets=BUCKETS, length_bucket=8,
            assume_think_open=True, optim=OptimConfig(lr=1e-2, weight_decay=0.0, grad_clip=1.0, total_steps=6),
            # An untrained model rarely writes the tags; without the format gate it still gets reward signal.
            reward=RewardConfig(format_gate=False, summary_max_tokens=16),
        ),
        eval=EvalRunConfig(sasrec_epochs=2),
        limits=LimitsConfig(train=128, valid=32, test=32),
        checkpoint=CheckpointConfig(every_steps=3, keep_last=1),
    )
