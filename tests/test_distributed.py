"""Multi-host start-up: environment detection (pure), process shards, and a real 2-process CPU run of the
stage-1 step over gloo collectives that must match one process with the same 4 devices."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from rporec_jax import distributed as dist
from rporec_jax.distributed import DistributedConfig, detect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")
# Variables a CI runner may carry that would change what a worker (or the launcher) detects.
_CLUSTER_VARS = ("RPOREC_COORDINATOR", "RPOREC_NUM_PROCESSES", "RPOREC_PROCESS_ID", "RPOREC_DISTRIBUTED",
                 "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "XLA_FLAGS")


# --- detect: one case per environment -------------------------------------------------------------------

def test_single_host_is_none():
    assert detect(DistributedConfig(), {}) is None
    assert detect(DistributedConfig(), {"HOME": "/root", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert detect(DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single-host TPU VM
    assert detect(DistributedConfig(num_processes=1), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None


def test_explicit_config_wins_over_environment():
    cfg = DistributedConfig("10.0.0.1:1234", 4, 2, local_device_ids=(0, 1))
    env = {"RPOREC_COORDINATOR": "x:1", "RPOREC_NUM_PROCESSES": "2", "RPOREC_PROCESS_ID": "0",
           "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}
    assert detect(cfg, env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                                "local_device_ids": [0, 1]}


def test_rporec_environment():
    env = {"RPOREC_COORDINATOR": "localhost:5555", "RPOREC_NUM_PROCESSES": "3", "RPOREC_PROCESS_ID": "1",
           "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}
    assert detect(DistributedConfig(), env) == {"coordinator_address": "localhost:5555", "num_processes": 3,
                                                "process_id": 1}
    assert detect(DistributedConfig(), {"RPOREC_NUM_PROCESSES": "1", "SLURM_JOB_ID": "7",
                                        "SLURM_NTASKS": "8"}) is None  # our launcher said one process


def test_auto_detected_clusters_let_jax_read_them():
    assert detect(DistributedConfig(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == {}
    assert detect(DistributedConfig(), {"SLURM_JOB_ID": "7", "SLURM_NPROCS": "2"}) == {}
    assert detect(DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3"}) == {}
    assert detect(DistributedConfig(), {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}) == {}
    assert detect(DistributedConfig(), {"RPOREC_DISTRIBUTED": "auto"}) == {}  # launch/tpu_pod.sh
    assert detect(DistributedConfig(), {"RPOREC_DISTRIBUTED": "off", "SLURM_JOB_ID": "7",
                                        "SLURM_NTASKS": "4"}) is None
    assert detect(DistributedConfig(local_device_ids=(0,)), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == \
        {"local_device_ids": [0]}


@pytest.mark.parametrize("cfg,env,match", [
    (DistributedConfig(coordinator_address="h:1"), {}, "num_processes, process_id missing"),
    (DistributedConfig(num_processes=2), {}, "coordinator_address, process_id missing"),
    (DistributedConfig("h:1", 2), {}, "process_id missing"),
    (DistributedConfig("h:1", 2, 2), {}, r"process_id=2 must be in \[0, num_processes=2\)"),
    (DistributedConfig("h", 2, 0), {}, "must be 'host:port'"),
    (DistributedConfig(), {"RPOREC_COORDINATOR": "h:1", "RPOREC_PROCESS_ID": "0"}, "RPOREC_NUM_PROCESSES missing"),
    (DistributedConfig(), {"RPOREC_COORDINATOR": "h:1", "RPOREC_NUM_PROCESSES": "two",
                           "RPOREC_PROCESS_ID": "0"}, "RPOREC_NUM_PROCESSES='two' must be an integer"),
    (DistributedConfig(), {"RPOREC_DISTRIBUTED": "yes"}, "expected 'auto'"),
])
def test_partial_or_bad_settings_name_the_field(cfg, env, match):
    with pytest.raises(ValueError, match=match):
        detect(cfg, env)


def test_config_validation():
    with pytest.raises(ValueError, match="cpu_collectives='nccl'"):
        DistributedConfig(cpu_collectives="nccl")


# --- process shards, single-host initialize -------------------------------------------------------------

def test_process_shard_is_contiguous_and_covers_everything():
    shards = [dist.process_shard(10, i, 4) for i in range(4)]
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert dist.process_shard(8, 1, 2) == range(4, 8)
    assert dist.process_shard(5) == range(5)  # this test process is the only one
    with pytest.raises(ValueError, match="process_index=2"):
        dist.process_shard(4, 2, 2)


def test_initialize_is_a_no_op_on_one_host(monkeypatch):
    for var in _CLUSTER_VARS[:-1]:
        monkeypatch.delenv(var, raising=False)
    info = dist.initialize()
    assert info == {"process_index": 0, "process_count": 1, "local_devices": jax.local_device_count(),
                    "global_devices": jax.device_count()}
    assert dist.initialize() is info  # idempotent
    assert not jax.distributed.is_initialized() and dist.is_primary()


# --- real processes -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS}
    # -O0 in the XLA backend: these tiny programs spend their time compiling; every run uses the same flags.
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    env.update(extra)
    return env


def _result(out: str) -> dict:
    lines = [line for line in out.splitlines() if "RESULT " in line]
    assert lines, out[-3000:]
    return json.loads(lines[-1].split("RESULT ", 1)[1])


def test_two_processes_match_one_process():
    """2 processes x 2 CPU devices joined over gloo vs 1 process x 4 devices: same mesh shape, same batches,
    same stage-1 losses. The gradient all-reduce and the item-matrix gather cross the process boundary."""
    coordinator = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, WORKER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(2, RPOREC_COORDINATOR=coordinator, RPOREC_NUM_PROCESSES="2",
                                                  RPOREC_PROCESS_ID=str(i)))
             for i in range(2)]
    # The one-process reference runs at the same time: wall time is what the 2-core budget is about.
    procs.append(subprocess.Popen([sys.executable, WORKER], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=_env(4)))
    try:
        outs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    r0, r1, ref = map(_result, outs)

    assert [r0["process_index"], r1["process_index"], ref["process_index"]] == [0, 1, 0]
    assert r0["process_count"] == 2 and r0["local_devices"] == 2 and r0["global_devices"] == 4
    assert ref["process_count"] == 1 and ref["global_devices"] == 4
    assert r0["mesh"] == [[[0], [0]], [[1], [1]]]  # 'data' splits across the processes
    assert r0["step"] == r1["step"] == ref["step"] == 5
    assert r0["losses"] == r1["losses"]  # replicated metrics: both processes read the same values
    for key in ("losses", "param_sq", "grad_norm"):
        assert r0[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key
    assert r0["losses"][-1] < r0["losses"][0]


@pytest.mark.skipif(shutil.which("bash") is None, reason="launch/local_multiprocess.sh needs bash")
def test_local_multiprocess_script():
    """The launcher starts N joined processes, prefixes their output, and when one fails stops the others
    (which would otherwise wait for the missing peer) and exits non-zero."""
    script = os.path.join(ROOT, "launch", "local_multiprocess.sh")
    env = _env(1, RPOREC_MODULE="distributed_worker", PYTHON=sys.executable, DEVICES_PER_PROCESS="2",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    env.pop("XLA_FLAGS")  # the launcher sets the device count
    ok = subprocess.run(["bash", script, "2", "--info"], check=False, env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    infos = {line[:3]: json.loads(line.split("RESULT ", 1)[1]) for line in ok.stdout.splitlines() if "RESULT" in line}
    assert infos["[0]"] == {"process_index": 0, "process_count": 2, "local_devices": 2, "global_devices": 4}
    assert infos["[1]"]["process_index"] == 1

    t0 = time.monotonic()
    bad = subprocess.run(["bash", script, "2", "--info", "--fail-process", "1"], check=False, env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "process 1 exited with status 3" in bad.stderr, bad.stdout + bad.stderr
    assert time.monotonic() - t0 < 30  # process 0 was stopped, not left waiting out its 60 s start-up timeout
