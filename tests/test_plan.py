"""TPU plan: abstract TPU topologies compiled on this CPU host (libtpu), loop-corrected HLO statistics, verdicts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the plan needs libtpu (the test extra installs it)")

from rporec_jax import config as C  # noqa: E402
from rporec_jax import plan as PL  # noqa: E402
from rporec_jax.launch import main  # noqa: E402


@pytest.fixture(autouse=True)
def run_precision():
    # conftest asks for 'highest' matmul precision (CPU parity tests); on a TPU that is a 6-pass fp32
    # emulation, 3x the compile time and not what a run compiles
    with jax.default_matmul_precision("default"):
        yield


def _layers(x, ws):
    def body(h, w):
        return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, ws)[0].sum()


def test_hlo_stats_count_loop_bodies_by_their_trip_count():
    # Reference: XLA's own cost analysis of the same program with the loop unrolled (no loop to miscount).
    one = jax.sharding.SingleDeviceSharding(PL.topology_devices("v5e:2x2")[0])
    x = jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=one)
    ws = jax.ShapeDtypeStruct((6, 256, 256), jnp.bfloat16, sharding=one)
    looped = jax.jit(_layers).lower(x, ws).compile()
    unrolled = jax.jit(_layers_unrolled).lower(x, ws).compile()
    stats = PL.hlo_stats(looped.as_text())
    assert 6 in stats["loops"] and stats["unknown_loops"] == 0
    expected = 6 * 2 * 64 * 256 * 256
    assert stats["flops"] == expected
    assert unrolled.cost_analysis()["flops"] >= expected  # the unrolled count (plus elementwise) agrees
    assert looped.cost_analysis()["flops"] < expected / 3  # what the loop body counted once would claim
    # HBM bytes: each iteration reads its layer's slice of the stacked weights, not the whole stack (measured:
    # 1.70 MB looped vs XLA's 1.09 MB for the unrolled program; the loop adds carries and copies)
    reference = unrolled.cost_analysis()["bytes accessed"]
    assert 0.8 * reference < stats["bytes"] < 2.0 * reference, (stats["bytes"], reference)
    assert PL.hlo_stats(unrolled.as_text())["bytes"] == pytest.approx(reference, rel=0.1)


def _layers_unrolled(x, ws):
    h = x
    for i in range(ws.shape[0]):
        h = jnp.tanh(h @ ws[i])
    return h.sum()


def test_collectives_are_read_from_the_hlo():
    devices = np.asarray(PL.topology_devices("v5e:2x2"))
    mesh = jax.sharding.Mesh(devices.reshape(4), ("x",))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    x = jax.ShapeDtypeStruct((1024, 128), jnp.float32, sharding=s)
    c = jax.jit(lambda a: a.sum(0), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                ).lower(x).compile()
    coll = PL.hlo_stats(c.as_text())["collectives"]
    assert coll["all-reduce"]["count"] >= 1 and coll["all-reduce"]["bytes"] >= 128 * 4


def test_every_program_of_the_synthetic_run_compiles(tmp_path, capsys):
    assert main(["plan", "--config", "synthetic", "--topology", "v5e:2x2", "--set", "mesh.data=4",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "plan.json").read_text())
    assert [r["program"] for r in report["rows"]] == ["cot_sampler", "rollout_sampler", "stage1_step",
                                                      "rechead_scoring", "grpo_update", "sasrec_step"]
    assert report["fits"] and report["devices"] == 4 and report["chip"]["name"] == "v5e"
    for r in report["rows"]:
        assert r["peak_bytes"] > 0 and r["flops"] > 0 and r["time_s"] > 0 and r["bound"], r
    rollout = next(r for r in report["rows"] if r["program"] == "rollout_sampler")
    assert C.load_config("synthetic").stage2.max_new_tokens in rollout["loops"]  # the decode loop's trip count
    assert "| grpo_update |" in (tmp_path / "plan.md").read_text() and "grpo_update" in capsys.readouterr().out


def test_fsdp_holds_a_quarter_of_the_update_arguments_per_chip():
    # Qwen3-0.6B shapes (built in: no weights) at the synthetic run's lengths; the tiny decoder's 32-wide
    # matrices would measure TPU tile padding (8 columns per chip pad to 128), not the sharding.
    args, gathers = {}, {}
    for strategy, mesh in (("dp", ["mesh.data=4"]), ("fsdp", ["mesh.data=1", "mesh.fsdp=4"])):
        cfg = C.load_config("synthetic", [f"strategy={strategy}", "backbone.path=Qwen/Qwen3-0.6B"] + mesh)
        report = PL.plan(cfg, "v5e:2x2", programs=["grpo_update"] + (["rollout_sampler"] if strategy == "dp" else []))
        rows = {r["program"]: r for r in report["rows"]}
        args[strategy] = rows["grpo_update"]["argument_bytes"]
        gathers[strategy] = rows["grpo_update"]["collectives"].get("all-gather", {}).get("count", 0)
        if strategy == "dp":
            dp_rows = rows
    assert args["fsdp"] / args["dp"] == pytest.approx(0.25, rel=0.1), args  # measured 0.2501
    assert gathers["fsdp"] > 0 == gathers["dp"]  # fsdp gathers the weights it shards; dp has nothing to gather

    # Loop-corrected FLOPs against the textbook count (N = 0.44B non-embedding parameters; the tied 0.16B
    # embedding costs a matmul only where logits are taken): the update runs the policy forward and backward
    # (6N per token) and the reference forward (2N); the sampler prefills each prompt once (4 after padding to
    # the 4 chips) and decodes G = 4 samples each. Measured: 8.77 vs 8.43 TFLOP, 1.44 vs 1.40 TFLOP.
    s2, d = cfg.stage2, PL.decoder_config(cfg)[0]
    emb = d.vocab_size * d.hidden_size
    n = report["backbone_params"] - emb
    rows, prompt, new = s2.batch_size * s2.num_samples, max(s2.prompt_buckets), s2.max_new_tokens
    update = 8 * n * rows * (prompt + new) + 8 * emb * rows * new
    prompts = 4
    sampler = (2 * n * (prompts * prompt + prompts * s2.num_samples * new)
               + 2 * emb * prompts * (1 + s2.num_samples * new))
    assert 4 * dp_rows["grpo_update"]["flops"] == pytest.approx(update, rel=0.1)
    assert 4 * dp_rows["rollout_sampler"]["flops"] == pytest.approx(sampler, rel=0.1)


def test_a_qwen3_06b_update_on_one_v5e_chip_does_not_fit(tmp_path, capsys):
    # The paper's lengths (prompt 2,048 + 1,024 new tokens, 16 prompts x G 4) with the whole model on one chip;
    # no weights on disk: the built-in Qwen3-0.6B shapes are used.
    code = main(["plan", "--config", "amazon_video_games", "--topology", "v5e-1", "--out", str(tmp_path),
                 "--set", "mesh.data=1", "--set", "strategy=dp", "--programs", "grpo_update"])
    err = capsys.readouterr()
    assert code == 1, err.err
    report = json.loads((tmp_path / "plan.json").read_text())
    assert "built-in shapes of Qwen/Qwen3-0.6B" in report["backbone"]
    update = next(r for r in report["rows"] if r["program"] == "grpo_update")
    assert not update["fits"] and update["peak_bytes"] > 16 * 2 ** 30
    assert update["largest_arguments"] and update["largest_temporaries"]
    md = (tmp_path / "plan.md").read_text()
    assert "grpo_update does not fit" in md and "does not fit: " in err.err


def test_bad_plans_are_refused_before_compiling(capsys):
    assert main(["plan", "--config", "synthetic", "--topology", "v9z-3"]) == 1
    assert "known: v5e-1" in capsys.readouterr().err
    assert main(["plan", "--config", "synthetic", "--topology", "v5e:2x2", "--set", "mesh.data=3"]) == 1
    assert "mesh" in capsys.readouterr().err
    # tp over the tiny decoder's 2 KV heads on 4 chips cannot divide
    assert main(["plan", "--config", "synthetic", "--topology", "v5e:2x2", "--set", "strategy=tp",
                 "--set", "mesh.data=1", "--set", "mesh.tp=4"]) == 1
    assert "strategy 'tp'" in capsys.readouterr().err


def test_preflight_names_the_program_that_will_not_fit():
    # On a CPU host the check is off; forced with a 1 MiB device it must stop on the samplers and the update.
    from rporec_jax import sharding as shd

    cfg = C.load_config("synthetic")
    mesh = shd.make_mesh(devices=jax.devices()[:1])
    assert PL.preflight(cfg, mesh) == []
    problems = PL.preflight(cfg, mesh, capacity=2 ** 20, force=True)
    assert [p.split(" ")[0] for p in problems] == ["cot_sampler", "rollout_sampler", "grpo_update"], problems
    assert "per device" in problems[0] and "launch plan" in problems[0]


def test_rollouts_under_fsdp_do_not_gather_weights_at_every_token():
    # The rollout role holds the weights replicated (resharded once per call); before, the decode loop
    # all-gathered every fsdp-sharded weight at every token (~the model's size per token on the paper config).
    cfg = C.load_config("synthetic", ["strategy=fsdp", "mesh.data=1", "mesh.fsdp=4"])
    row = PL.plan(cfg, "v5e:2x2", programs=["rollout_sampler"])["rows"][0]
    assert "weights held as dp" in row["note"]
    model_bytes = 4 * sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        PL._param_shapes(PL.decoder_config(cfg)[0])))
    gathered = row["collectives"].get("all-gather", {}).get("bytes", 0.0)
    assert gathered < 0.1 * model_bytes * cfg.stage2.max_new_tokens, (gathered, model_bytes)
