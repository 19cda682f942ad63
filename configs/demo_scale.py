"""MovieLens-100K at the scale that can rank the rows (issue #16): `demo` with a Rechead fit on 4,096 CoT'd
train instances, 1,000 valid and 1,000 test instances (of MovieLens-100K's 943 users), 60 GRPO steps on train
instances stage 1 did not see, and every sampler call at batch 64.

Sizing (2-core EPYC, SmolLM2-135M fp32; prompts 266 tokens median, 319 max; 64 new tokens with the forced
format): a batch-64 decode step costs ~0.8 s (`docs/performance.md`), i.e. ~0.8 s of decoding per instance,
and the prefill about as much again (2 N T = 72 GFLOP per 266-token prompt at ~60-100 GFLOP/s), so ~1.5-2 s
per CoT: the 6,096 teacher CoTs (train + valid + test) are ~3 h, the policy's 2,000 evaluation CoTs ~1 h,
60 GRPO steps ~1 h (67 s/step measured on the demo). That is more than one 3-hour session: every stage
resumes (`benchmarks/results.py --configs demo_scale ...` continues from its run dirs and `rows.jsonl`).
The stage-2 learning rate is the reference's x10; the issue's sweep (KL 1e-2 to 1e-1, judged on valid only)
overrides it with `--set stage2.optim.lr=...`.
"""

from rporec_jax.config import RunConfig, apply_overrides, load_config


def config() -> RunConfig:
    return apply_overrides(load_config("demo"), [
        "name=demo_scale",
        "limits.train=4096", "limits.valid=1000", "limits.test=1000",
        "cot.batch_size=64", "cot.shard_size=512",
        "eval.policy_batch_size=64",
        # 4,096 instances: 64 steps an epoch; valid NDCG@10 after every epoch (the curve of item 3)
        "stage1.batch_size=64", "stage1.epochs=8", "stage1.optim.total_steps=512", "stage1.log_every=16",
        # GRPO prompts: train instances 4096.. (stage 1 was fit on 0..4095)
        "stage2.steps=60", "stage2.optim.total_steps=60", "stage2.optim.lr=1e-5", "stage2.prompt_offset=4096",
        "eval.sasrec_epochs=20",
    ])
