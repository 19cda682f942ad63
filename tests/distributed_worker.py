"""Worker of tests/test_distributed.py: a few real stage-1 steps on a global ('data'=2, 'fsdp'=2) mesh.

Run alone it uses this process's devices; started with RPOREC_COORDINATOR / RPOREC_NUM_PROCESSES /
RPOREC_PROCESS_ID it first joins the other processes, and the mesh spans all of their devices. Every process
builds the same examples (seeded NumPy) but hands JAX only its own rows of each global batch, so the
gradient all-reduce and the item-matrix gather (items shard over 'fsdp') cross processes.
Prints one line `RESULT {json}` with the per-step losses and a checksum of the trained parameters.

Options (for launch/local_multiprocess.sh tests): `--info` only joins and prints the process info;
`--fail-process K` makes process K exit with status 3 before joining (the others then wait for it).
"""

import json
import os
import sys

# Importing creates no JAX state; initialize() in main() runs before any JAX call, as JAX requires.
from rporec_jax import distributed

STEPS, BATCH, VOCAB, ITEMS, NEG, LEN, DIM = 5, 16, 50, 19, 7, 6, 16


def examples(n: int, seed: int = 0) -> dict:
    """Toy stage-1 examples `[n, ...]`: the prompt's first token is the target item id."""
    import numpy as np

    rng = np.random.default_rng(seed)
    target = rng.integers(1, ITEMS + 1, n)
    ids = rng.integers(0, VOCAB, (n, LEN))
    ids[:, 0] = target
    neg = (target[:, None] + rng.integers(1, ITEMS, (n, NEG)) - 1) % ITEMS + 1
    return {"prompt_ids": ids.astype(np.int32), "prompt_mask": np.ones((n, LEN), bool),
            "target": target.astype(np.int32), "negatives": neg.astype(np.int32)}


def main(argv: list[str]) -> None:
    fail = argv[argv.index("--fail-process") + 1] if "--fail-process" in argv else None
    if fail is not None and os.environ.get(distributed.ENV_PROCESS_ID) == fail:
        sys.exit(3)
    info = distributed.initialize(distributed.DistributedConfig(timeout_s=60))
    if "--info" in argv:
        print("RESULT " + json.dumps(info), flush=True)
        return

    import jax
    import jax.numpy as jnp
    import numpy as np

    from rporec_jax import sharding as shd
    from rporec_jax.models.rechead import RecheadConfig, init_rechead
    from rporec_jax.train.stage1 import make_stage1_step, stage1_state
    from rporec_jax.train.state import OptimConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2))
    head = RecheadConfig(variant="prompt_only", dim=DIM, vocab_size=VOCAB, dropout=0.0)
    data = examples(STEPS * BATCH)
    params = init_rechead(head, jax.random.key(0), {k: v[:2] for k, v in data.items()})
    items = np.random.default_rng(1).normal(size=(ITEMS + 1, DIM)).astype(np.float32)
    # jax 0.10 cannot device_put a typed key to devices of other processes (only arrays of numbers), as
    # TrainState.create does; so place its raw data and re-wrap it.
    key = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(jax.random.key(1)), shd.replicated(mesh)))
    state = stage1_state(head, params, items, OptimConfig(lr=1e-2, total_steps=STEPS), key, mesh, "fsdp")
    step = make_stage1_step(head, state, mesh)

    rows = distributed.process_shard(BATCH)
    losses = []
    for s in range(STEPS):
        batch = {}
        for k, v in data.items():
            v = v[s * BATCH:(s + 1) * BATCH]
            sharding = shd.batch_sharding(mesh, v.ndim)
            # The rows JAX expects from this process must be the ones process_shard says it loads.
            mine = sorted({i for idx in sharding.addressable_devices_indices_map(v.shape).values()
                           for i in range(BATCH)[idx[0]]})
            assert mine == list(rows), (mine, rows)
            batch[k] = jax.make_array_from_process_local_data(sharding, v[rows.start:rows.stop], v.shape)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))  # metrics are replicated: readable on every process

    sq = jax.jit(lambda t: sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(t)),
                 out_shardings=shd.replicated(mesh))(state.params)
    print("RESULT " + json.dumps({**info, "losses": losses, "param_sq": float(sq),
                                  "grad_norm": float(metrics["grad_norm"]), "step": int(state.step),
                                  "mesh": np.vectorize(lambda d: d.process_index)(mesh.devices).tolist()}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
