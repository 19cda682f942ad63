"""Amazon-2018 Industrial_and_Scientific (5-core, LC-Rec `Scientific.inter.json` / `.item.json`) from
$RPOREC_DATA_DIR/amazon18-scientific, with SmolLM2-135M-Instruct and MiniLM static towers; limits like the demo.

LC-Rec data has no timestamps, so the split is leave-one-out. Item texts are long (descriptions), so histories
are 3 items with descriptions cut to 100 characters: prompts of 368 tokens median, 482 max; budget 448 drops the
oldest item of the ~5% longer ones. Lengths, steps and epochs as configs/demo.py (trimmed by its measured stage
times), with 448-token prompts.
"""

import os

from rporec_jax.config import (
    EncoderConfig,
    EvalRunConfig,
    LimitsConfig,
    ModelConfig,
    RunConfig,
)
from rporec_jax.data import DataConfig, LCRecConfig, PromptConfig, SplitConfig
from rporec_jax.models.rechead import RecheadConfig
from rporec_jax.rewards import RewardConfig
from rporec_jax.sampling import ForceFormat
from rporec_jax.train.cot import CoTConfig
from rporec_jax.train.stage1 import Stage1Config
from rporec_jax.train.stage2 import Stage2Config
from rporec_jax.train.state import OptimConfig

BUCKETS = (456,)  # the 448-token prompt budget + room for the prefilled <think> (3 SmolLM2 tokens)
# Budget forcing of the answer format: 36 reasoning + 17 answer tokens + SmolLM2's 11 forced tokens
# (`</think>\n<answer>` 7, `</answer>` 3, <|im_end|>) = the 64 new tokens of CoT, rollouts and evaluation.
FORCE = ForceFormat(enabled=True, think_tokens=36, answer_tokens=17)


def config() -> RunConfig:
    root = os.path.join(os.environ.get("RPOREC_DATA_DIR", "data"), "amazon18-scientific")
    return RunConfig(
        name="scientific",
        data=DataConfig(source=LCRecConfig(root=root, prefix="Scientific", max_description_chars=100),
                        split=SplitConfig(kind="leave_one_out", window=3),
                        prompt=PromptConfig(max_prompt_tokens=448), num_negatives=49),
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
        rechead=RecheadConfig(variant="text_fusion", dim=384, vocab_size=0),
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
