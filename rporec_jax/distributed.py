"""Multi-host start-up: find out whether this process is one of several, and join them with
`jax.distributed.initialize` before any other JAX call; a no-op on one host.

    info = initialize(DistributedConfig())   # {'process_index', 'process_count', 'local_devices', 'global_devices'}
    rows = process_shard(num_examples)       # the example indices this process loads

Where the settings come from, first match wins:
1. explicit `DistributedConfig` fields (coordinator_address, num_processes > 1, process_id >= 0);
2. RPOREC_COORDINATOR / RPOREC_NUM_PROCESSES / RPOREC_PROCESS_ID (set by launch/local_multiprocess.sh);
3. RPOREC_DISTRIBUTED=auto (JAX reads the cluster itself; set by launch/tpu_pod.sh, since a TPU VM keeps its
   worker list in GCE metadata, not in the environment) or =off (one host, whatever else is set);
4. SLURM with more than one task, or 5. a multi-host TPU pod (TPU_WORKER_HOSTNAMES, MEGASCALE_*): JAX reads
   the cluster itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "RPOREC_COORDINATOR"
ENV_NUM_PROCESSES = "RPOREC_NUM_PROCESSES"
ENV_PROCESS_ID = "RPOREC_PROCESS_ID"
ENV_MODE = "RPOREC_DISTRIBUTED"  # 'auto' | 'off'
CPU_COLLECTIVES = ("gloo", "mpi")  # jax 0.10's jax_cpu_collectives_implementation values we support

_INFO: dict | None = None  # set by the first initialize(); later calls return it unchanged


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others. The defaults detect everything from the environment."""

    coordinator_address: str = ""  # 'host:port' of process 0; every process passes the same one
    num_processes: int = 0  # 0: not set here
    process_id: int = -1  # -1: not set here; else 0 .. num_processes - 1
    local_device_ids: tuple = ()  # restrict this process to these local accelerators; () = all
    cpu_collectives: str = "gloo"  # cross-process collectives of the CPU backend (CPU-only multi-process runs)
    timeout_s: int = 300  # how long to wait for every process to connect

    def __post_init__(self):
        if self.cpu_collectives not in CPU_COLLECTIVES:
            raise ValueError(f"DistributedConfig.cpu_collectives={self.cpu_collectives!r}; expected one of "
                             f"{CPU_COLLECTIVES}")
        if self.timeout_s <= 0:
            raise ValueError(f"DistributedConfig.timeout_s={self.timeout_s} must be positive")


def _explicit(address: str, num: int | None, pid: int | None, names: tuple[str, str, str]) -> dict | None:
    """Returns initialize kwargs from a (coordinator, count, id) triple, None when it says 'one process';
    raises when only part of it is given. `names` are how the user spelled the three settings."""
    given = {names[0]: bool(address), names[1]: num is not None, names[2]: pid is not None}
    if not any(given.values()) or (num == 1 and pid in (None, 0) and not address):
        return None  # nothing set, or an explicit "one process" that needs no coordinator
    missing = [n for n, ok in given.items() if not ok]
    if missing:
        have = ", ".join(n for n, ok in given.items() if ok)
        raise ValueError(f"multi-process settings are incomplete: {have} set but {', '.join(missing)} missing; "
                         f"set all three ({', '.join(names)}) on every process, or none of them for one host")
    if num < 1:
        raise ValueError(f"{names[1]}={num} must be >= 1")
    if not 0 <= pid < num:
        raise ValueError(f"{names[2]}={pid} must be in [0, {names[1]}={num})")
    if ":" not in address:
        raise ValueError(f"{names[0]}={address!r} must be 'host:port' (e.g. 10.0.0.1:8476)")
    if num == 1:
        return None
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def detect(cfg: DistributedConfig = DistributedConfig(), environ: Mapping[str, str] = os.environ) -> dict | None:
    """Returns the kwargs for `jax.distributed.initialize` ({} = let JAX auto-detect the cluster), or None
    when this is the only process. Pure: reads only `cfg` and `environ`."""
    extra = {"local_device_ids": list(cfg.local_device_ids)} if cfg.local_device_ids else {}
    if cfg.coordinator_address or cfg.num_processes > 0 or cfg.process_id >= 0:
        # explicit config wins over the environment, even when it says "one process"
        kwargs = _explicit(cfg.coordinator_address, cfg.num_processes if cfg.num_processes > 0 else None,
                           cfg.process_id if cfg.process_id >= 0 else None,
                           ("coordinator_address", "num_processes", "process_id"))
        return None if kwargs is None else {**kwargs, **extra}
    kwargs = _explicit(environ.get(ENV_COORDINATOR, "").strip(), _env_int(environ, ENV_NUM_PROCESSES),
                       _env_int(environ, ENV_PROCESS_ID), (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID))
    if kwargs is not None:
        return {**kwargs, **extra}
    if _env_int(environ, ENV_NUM_PROCESSES) == 1:
        return None  # our launcher said "one process"; do not fall through to the cluster checks
    mode = environ.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"{ENV_MODE}={mode!r}; expected 'auto' (let JAX detect the cluster) or 'off' (one host)")
    if mode:
        return dict(extra) if mode == "auto" else None
    # SLURM: an allocation with one task (e.g. an interactive salloc) is a single host.
    if "SLURM_JOB_ID" in environ:
        tasks = _env_int(environ, "SLURM_NTASKS") or _env_int(environ, "SLURM_NPROCS") or 1
        if tasks > 1:
            return dict(extra)
    # TPU pod: a single-host TPU VM also lists itself in TPU_WORKER_HOSTNAMES.
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return dict(extra)
    return None


def _info() -> dict:
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}


def initialize(cfg: DistributedConfig = DistributedConfig()) -> dict:
    """Joins the other processes (if any) and returns {process_index, process_count, local_devices,
    global_devices}. Call before any other JAX call; idempotent (later calls return the first result)."""
    global _INFO
    if _INFO is not None:
        return _INFO
    kwargs = detect(cfg)
    if kwargs is not None and not jax.distributed.is_initialized():
        # Only the CPU backend reads this flag, so setting it is harmless on GPU/TPU hosts; it must be set
        # before the CPU client exists, which initialize() below does not create yet.
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        log.info("jax.distributed.initialize(%s)", kwargs)
        jax.distributed.initialize(**kwargs, initialization_timeout=cfg.timeout_s)
    _INFO = _info()
    log.info("process %d of %d: %d local / %d global devices", _INFO["process_index"], _INFO["process_count"],
             _INFO["local_devices"], _INFO["global_devices"])
    return _INFO


def is_primary() -> bool:
    """Returns True on process 0, the one that writes reports, logs and (non-collective) files."""
    return jax.process_index() == 0


def process_shard(n: int, process_index: int | None = None, process_count: int | None = None) -> range:
    """Returns the contiguous example indices `[start, stop)` of `n` that this process loads.

    Shards are contiguous by process index and differ in size by at most one (the first `n % count`
    processes get one more). Contiguous, process-major shards match a batch sharded over ('data', 'fsdp')
    on a mesh whose devices are ordered by process, which is what `jax.make_array_from_process_local_data`
    expects; for equal local batch shapes keep `n` a multiple of the process count (pad if needed).
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    size, extra = divmod(n, count)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))
