"""Plan before you rent: compile every jitted program of a run for a TPU topology on a CPU host.

    python -m rporec_jax.launch plan --config amazon_video_games --topology v5e-8 --set strategy=fsdp

With libtpu installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` gives abstract TPU devices and
`jit(...).lower(abstract inputs).compile()` compiles for them here. Parameters are abstract (shapes from the model
config, no weights read). For each program and chip the plan reports memory (arguments, outputs, temporaries,
peak vs HBM), loop-corrected matmul FLOPs and HBM bytes, collectives by kind and bytes (from the optimised HLO),
a roofline step time and its bound, and whether it fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rporec_jax import sharding as shd

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-device figures (a JAX device: one chip, or one TensorCore on v4 without megacore)."""

    name: str
    hbm_bytes: int
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s, the chip's inter-chip interconnect bandwidth
    source: str


# Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e); ICI = the pages'
# per-chip "interchip interconnect" Gbit/s / 8 (v4: 6 links x 50 GB/s in the TPU v4 paper, ISCA 2023). One JAX
# device is one chip (v4 and v5p run their two TensorCores as one megacore device, as the TPU runtime does).
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 2400e9 / 8,
                   "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s per chip"),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8,
                        "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 1,600 Gbps"),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8,
                   "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s, ICI 4,800 Gbps"),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8,
                        "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GiB HBM at 1,640 GB/s, ICI 3,584 Gbps"),
}

# Product names -> (jax topology, chips per host). v4/v5p names count TensorCores, v5e/v6e names count chips.
TOPOLOGIES = {
    "v5e-1": ("v5e:1x1", (1, 1, 1)), "v5e-4": ("v5e:2x2", (2, 2, 1)), "v5e-8": ("v5e:2x4", (2, 4, 1)),
    "v5e-16": ("v5e:4x4", (2, 2, 1)), "v5e-32": ("v5e:4x8", (2, 2, 1)),
    "v4-8": ("v4:2x2x1", None), "v4-16": ("v4:2x2x2", None), "v4-32": ("v4:2x2x4", None),
    "v5p-8": ("v5p:2x2x1", None), "v5p-16": ("v5p:2x2x2", None), "v5p-64": ("v5p:2x4x4", None),
    "v6e-1": ("v6e:1x1", (1, 1, 1)), "v6e-4": ("v6e:2x2", (2, 2, 1)), "v6e-8": ("v6e:2x4", (2, 4, 1)),
}

# Backbone shapes for planning without weights (HF config.json values), used when no local config is found.
BACKBONES = {
    "Qwen/Qwen3-0.6B": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                            num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                            max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True),
    # the synthetic config's tiny random decoder (its word vocabulary depends on the data: ~300, rounded up)
    "tiny-random": dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=4096),
}
# Text encoders: (vocabulary, width) of the static towers the text Recheads start from.
ENCODERS = {"sentence-transformers/static-retrieval-mrl-en-v1": (30522, 1024),
            "": (30522, 384), "tiny-random": (512, 0)}
# Catalogue sizes when the dataset is not prepared here (Amazon 2023: the reference's >= 10,000 items window).
NOMINAL_ITEMS = {"SyntheticConfig": 200, "MovieLensConfig": 1682, "LCRecConfig": 4344, "Amazon2023Config": 10000}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class PlanError(ValueError):
    """A plan that cannot be made (unknown topology, libtpu missing, mesh or strategy that cannot apply)."""


# --------------------------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------------------------

def topology_devices(name: str) -> list:
    """Returns the abstract TPU devices of topology `name` (a TOPOLOGIES name or a jax string like 'v5e:2x2')."""
    if name in TOPOLOGIES:
        topo, per_host = TOPOLOGIES[name]
    elif re.fullmatch(r"v\d+[a-z]*:\d+(x\d+){1,2}", name):
        topo, per_host = name, None
    else:
        raise PlanError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)} or a jax topology string "
                        "such as 'v5e:2x2' or 'v5p:2x2x2'")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError("planning for TPU needs libtpu: pip install -e '.[tpu]' (jax[tpu] matching the pinned jax)") \
            from None
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock on first load; a plan only compiles, so it may share the host with
    # another plan (or a test run) instead of failing on the lock
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kw = {} if per_host is None else {"chips_per_host_bounds": per_host}
    if topo.startswith(("v4", "v5p")):
        kw["chip_config_name"] = "megacore"  # one device per chip, as the TPU runtime runs them
    try:
        return list(topologies.get_topology_desc(topology_name=topo, platform="tpu", **kw).devices)
    except Exception as e:  # libtpu's own message says which bound failed
        raise PlanError(f"topology {name!r} ({topo}): {e}") from None


def chip_of(device) -> Chip:
    """Returns the Chip figures of an (abstract or real) TPU device."""
    if device.device_kind not in CHIPS:
        raise PlanError(f"no chip figures for device kind {device.device_kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[device.device_kind]


# --------------------------------------------------------------------------------------------------------------
# HLO statistics with loop trip counts
# --------------------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+)(?: \((.*)\) -> .*)? \{$")  # unoptimised HLO: no signature
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_CALLS = re.compile(r"(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "iota", "copy-done", "all-gather-done",
               "all-reduce-done", "collective-permute-done", "async-done", "opt-barrier", "custom-call"}


def _arrays(shape: str) -> list[tuple[str, list[int]]]:
    return [(dt, [int(d) for d in dims.split(",") if d]) for dt, dims in _ARRAY.findall(shape)]


def _nbytes(shape: str) -> float:
    return sum(_DTYPE_BYTES.get(dt, 1 if dt.startswith("f8") else 4) * math.prod(dims) for dt, dims in _arrays(shape))


def _split_instruction(line: str) -> Optional[tuple[str, str, str, str]]:
    """Returns (name, shape, opcode, rest) of an HLO instruction line."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape: balanced parentheses
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    return m.group(1), shape, opcode, rest


def _parse(hlo: str) -> tuple[dict, str]:
    """Returns ({computation: [(name, shape, opcode, rest)]}, entry computation name)."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            for pname, pshape in re.findall(r"([\w.\-]+): ((?:\([^)]*\))|[^,()]+)", h.group(2) or ""):
                comps[current].append((pname, pshape, "parameter", ""))
            continue
        if current is not None:
            ins = _split_instruction(line)
            if ins:
                comps[current].append(ins)
    if entry is None:
        raise PlanError("no ENTRY computation in the HLO text")
    return comps, entry


def _trip_count(cond: list) -> Optional[int]:
    """Returns the trip count of a while loop from its condition (`i < constant`, i counting from 0)."""
    consts = {}
    for name, shape, op, rest in cond:
        if op == "constant":
            m = re.match(r"\s*(-?\d+)\)", rest)
            if m:
                consts[name] = int(m.group(1))
    for name, shape, op, rest in cond:
        if op == "compare" and "direction=LT" in rest:
            for operand in re.findall(r"%([\w.\-]+)", rest.split(")")[0]):
                if operand in consts:
                    return consts[operand]
    return None


def _window(rest: str, key: str, n: int, default: int) -> list:
    m = re.search(key + r"=([0-9_x]+)", rest)
    if not m:
        return [default] * n
    return [tuple(int(v) for v in part.split("_")) if "_" in part else int(part) for part in m.group(1).split("x")]


def _valid_pairs(out: int, size: int, stride: int, pad_lo: int, lhs: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Returns how many (output, window) position pairs of one spatial dimension read a real input element
    (not padding, not a hole of lhs dilation), as XLA's own cost analysis counts a convolution."""
    span = (lhs - 1) * lhs_dilate
    return sum(1 for o in range(out) for k in range(size)
               if 0 <= (x := o * stride + k * rhs_dilate - pad_lo) <= span and x % lhs_dilate == 0)


def _conv_flops(out_shape: str, rest: str, shapes: dict) -> float:
    """Returns the multiply-add FLOPs (x2) of a dot, or of a convolution counting only window positions that
    meet real input (the TPU compiler writes some batched matmuls as padded, dilated convolutions)."""
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    out = _arrays(out_shape)
    if not out or len(operands) < 2:
        return 0.0
    n_out = math.prod(out[0][1])
    if "lhs_contracting_dims" in rest:  # dot
        lhs = _arrays(shapes.get(operands[0], ""))
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest)
        if not lhs or not dims:
            return 0.0
        k = math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
        return 2.0 * n_out * k
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    lhs, rhs = _arrays(shapes.get(operands[0], "")), _arrays(shapes.get(operands[1], ""))
    if not labels or not rhs or not lhs:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs_d, rhs_d, out_d = lhs[0][1], rhs[0][1], out[0][1]
    spatial = sorted({c for c in rhs_l if c.isdigit()})
    n = len(spatial)
    size = [rhs_d[rhs_l.index(c)] for c in spatial]
    stride, lhs_dil, rhs_dil = _window(rest, "stride", n, 1), _window(rest, "lhs_dilate", n, 1), \
        _window(rest, "rhs_dilate", n, 1)
    pad = _window(rest, "pad", n, (0, 0))
    pairs = math.prod(_valid_pairs(out_d[out_l.index(c)], size[i], stride[i], pad[i][0], lhs_d[lhs_l.index(c)],
                                   lhs_dil[i], rhs_dil[i]) for i, c in enumerate(spatial))
    groups = re.search(r"feature_group_count=(\d+)", rest)
    in_features = rhs_d[rhs_l.index("i")]
    non_spatial_out = n_out // max(1, math.prod(out_d[out_l.index(c)] for c in spatial))
    return 2.0 * non_spatial_out * pairs * in_features / (int(groups.group(1)) if groups else 1)


_SLICES = ("dynamic-slice", "slice", "gather")


def _operands(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")")[0])


def _param_reads(comps: dict, comp: str, memo: dict) -> list[float]:
    """Returns the bytes each parameter of fused computation `comp` is read: a parameter only sliced (also
    through nested fusions) reads its slices; one updated in place by dynamic-update-slice reads nothing."""
    if comp in memo:
        return memo[comp]
    body = comps.get(comp, [])
    shapes = {name: shape for name, shape, _, _ in body}
    params = [name for name, _, op, _ in body if op == "parameter"]
    users: dict = {}
    for name, shape, op, rest in body:
        for pos, o in enumerate(_operands(rest)):
            users.setdefault(o, []).append((pos, shape, op, rest))
    reads = []
    for p in params:
        total = 0.0
        for pos, shape, op, rest in users.get(p, []):
            if op in _SLICES and pos == 0:
                total += _nbytes(shape)
            elif op == "dynamic-update-slice" and pos == 0:
                continue
            elif op == "fusion" and (callee := dict(_CALLS.findall(rest)).get("calls")) in comps:
                inner = _param_reads(comps, callee, memo)
                total += inner[pos] if pos < len(inner) else _nbytes(shapes[p])
            else:
                total = _nbytes(shapes[p])
                break
        reads.append(min(total, _nbytes(shapes[p])))
    memo[comp] = reads
    return reads


def _written(comps: dict, comp: str, shape: str) -> float:
    """Returns the bytes a fusion writes: the update of an in-place dynamic-update-slice root, else its output."""
    body = comps.get(comp, [])
    if body and body[-1][2] == "dynamic-update-slice":
        upd = _operands(body[-1][3])
        return _nbytes({n: sh for n, sh, _, _ in body}.get(upd[1], "")) if len(upd) > 1 else 0.0
    return _nbytes(shape)


def _traffic(shape: str, op: str, rest: str, shapes: dict, comps: dict, memo: dict) -> float:
    """Returns the HBM bytes one top-level instruction moves: operands and output, except that an operand only
    sliced (a layer's row of stacked weights, a KV-cache read) counts its slices, and an in-place
    dynamic-update-slice (a KV-cache write) counts its update, as the TPU executes them."""
    operands = _operands(rest)
    if op == "dynamic-update-slice":
        return 2.0 * _nbytes(shapes.get(operands[1], "")) if len(operands) > 1 else 0.0
    if op in _SLICES:
        return 2.0 * _nbytes(shape)
    callee = dict(_CALLS.findall(rest)).get("calls") if op == "fusion" else None
    if callee not in comps:
        return _nbytes(shape) + sum(_nbytes(shapes.get(o, "")) for o in operands)
    reads = _param_reads(comps, callee, memo)
    return sum(reads[i] if i < len(reads) else _nbytes(shapes.get(o, "")) for i, o in enumerate(operands)) + \
        _written(comps, callee, shape)


def hlo_stats(hlo: str) -> dict:
    """Returns per-device {'flops', 'bytes', 'collectives': {kind: {'count', 'bytes'}}, 'loops': [trip counts],
    'unknown_loops', 'largest': [(bytes, name, op_name)]} of optimised HLO text, every instruction counted as
    often as its enclosing while loops run (XLA's cost_analysis counts a loop body once)."""
    comps, entry = _parse(hlo)
    mult = {entry: 1.0}
    control = {entry}  # computations whose instructions move data through HBM (not fusion bodies)
    loops, unknown, order = [], 0, [entry]
    seen = {entry}
    while order:
        comp = order.pop(0)
        for name, shape, op, rest in comps.get(comp, []):
            callees = [(kind, callee) for kind, callee in _CALLS.findall(rest)]
            for b in _BRANCHES.findall(rest):
                callees += [("branch", c.strip().lstrip("%")) for c in b.split(",") if c.strip()]
            trip = 1
            if op == "while":
                cond = dict(callees).get("condition")
                trip = _trip_count(comps.get(cond, []))
                if trip is None:
                    unknown, trip = unknown + 1, 1
                loops.append(trip)
            for kind, callee in callees:
                if callee not in comps:
                    continue
                factor = trip if kind in ("body", "condition") else 1
                mult[callee] = mult.get(callee, 0.0) + mult[comp] * factor
                if kind in ("body", "branch", "true_computation", "false_computation") or \
                        (kind in ("calls", "to_apply") and op in ("call", "async-start")):
                    control.add(callee)
                if callee not in seen:
                    seen.add(callee)
                    order.append(callee)
    flops = traffic = 0.0
    memo: dict = {}
    coll = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
    largest = []
    for comp, instrs in comps.items():
        m = mult.get(comp, 0.0)
        if not m:
            continue
        shapes = {name: shape for name, shape, _, _ in instrs}
        for name, shape, op, rest in instrs:
            if op in ("dot", "convolution"):
                flops += m * _conv_flops(shape, rest, shapes)
            base = op.removesuffix("-start")
            if base in COLLECTIVES:
                size = max((_nbytes(f"{dt}[{','.join(map(str, d))}]") for dt, d in _arrays(shape)), default=0)
                coll[base]["count"] += int(m)
                coll[base]["bytes"] += m * size
            if comp not in control:
                continue
            if op not in _NO_TRAFFIC and not op.endswith("-done"):
                traffic += m * _traffic(shape, op, rest, shapes, comps, memo)
            if op not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
                where = re.search(r'op_name="([^"]*)"', rest)
                biggest = max((_nbytes(f"{dt}[{','.join(map(str, d))}]") for dt, d in _arrays(shape)), default=0)
                largest.append((biggest, name, f"{op} {where.group(1)}" if where else op))
    largest.sort(reverse=True)
    return {"flops": flops, "bytes": traffic, "collectives": coll, "loops": loops, "unknown_loops": unknown,
            "largest": largest[:5]}


# --------------------------------------------------------------------------------------------------------------
# One program: compile and analyse
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Program:
    """A jitted function and the abstract arguments the run gives it."""

    name: str
    fn: Any  # a jax.jit-wrapped function (shardings set)
    args: tuple
    note: str = ""


def _per_device_bytes(tree) -> list[tuple[int, str]]:
    """Returns [(per-device bytes, pytree path)] of abstract arguments, largest first."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        dtype = jnp.dtype(x.dtype) if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.uint32
        out.append((int(math.prod(shape)) * jnp.dtype(dtype).itemsize, jax.tree_util.keystr(path)))
    return sorted(out, reverse=True)


def _out_of_memory(program: Program, lowered, chip: Chip, error: Exception, seconds: float) -> dict:
    """Returns the plan row of a program the TPU compiler refused for HBM: arguments per device, the
    temporaries its message states, and the largest buffers of the unoptimised program (global shapes)."""
    msg = str(error).strip().splitlines()[0]
    m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", msg)
    temp = float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_") if m else 0.0
    args = _per_device_bytes(program.args)
    arg_bytes = sum(b for b, _ in args)
    stats = hlo_stats(lowered.as_text(dialect="hlo", debug_info=True))
    return {"program": program.name, "note": program.note, "compile_s": round(seconds, 1),
            "argument_bytes": arg_bytes, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": int(temp),
            "peak_bytes": int(arg_bytes + temp), "hbm_bytes": chip.hbm_bytes, "fits": False, "error": msg,
            "flops": 0.0, "bytes_accessed": 0.0, "xla_cost_flops_loop_body_once": 0.0, "collectives": {},
            "collective_bytes": 0.0, "loops": stats["loops"], "unknown_loops": stats["unknown_loops"],
            "time_s": float("nan"), "times_s": {}, "bound": "n/a",
            "largest_arguments": [{"bytes": b, "path": p} for b, p in args[:5]],
            "largest_temporaries": [{"bytes": int(b), "hlo": n, "op": o + " (global shape)"}
                                    for b, n, o in stats["largest"]]}


def analyse(program: Program, chip: Chip) -> dict:
    """Returns the plan row of one program: compile it and read memory, FLOPs, bytes and collectives."""
    t = time.time()
    lowered = program.fn.lower(*program.args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that cannot fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _out_of_memory(program, lowered, chip, e, time.time() - t)
    seconds = time.time() - t
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    stats = hlo_stats(compiled.as_text())
    coll_bytes = sum(c["bytes"] for c in stats["collectives"].values())
    times = {"compute": stats["flops"] / chip.bf16_flops, "memory": stats["bytes"] / chip.hbm_bw,
             "collectives": coll_bytes / chip.ici_bw}
    bound = max(times, key=times.get)
    raw = compiled.cost_analysis() or {}
    if isinstance(raw, (list, tuple)):
        raw = raw[0] if raw else {}
    row = {
        "program": program.name, "note": program.note, "compile_s": round(seconds, 1),
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(peak), "hbm_bytes": chip.hbm_bytes, "fits": bool(peak <= chip.hbm_bytes),
        "flops": stats["flops"], "bytes_accessed": stats["bytes"],
        "xla_cost_flops_loop_body_once": float(raw.get("flops", 0.0)),
        "collectives": {k: v for k, v in stats["collectives"].items() if v["count"]},
        "collective_bytes": coll_bytes, "loops": stats["loops"], "unknown_loops": stats["unknown_loops"],
        "time_s": times[bound], "times_s": times, "bound": bound,
    }
    if not row["fits"]:
        row["largest_arguments"] = [{"bytes": b, "path": p} for b, p in _per_device_bytes(program.args)[:5]]
        row["largest_temporaries"] = [{"bytes": int(b), "hlo": n, "op": o} for b, n, o in stats["largest"]]
    return row


# --------------------------------------------------------------------------------------------------------------
# The programs of a run, with abstract inputs
# --------------------------------------------------------------------------------------------------------------

def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        dtype = jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: _sds(x.shape, x.dtype, s), tree, shardings)


def _key(mesh):
    return _sds((), jax.random.key(0).dtype, shd.replicated(mesh))


def decoder_config(cfg) -> Any:
    """Returns the backbone's DecoderConfig from its local config.json when present, else from BACKBONES."""
    from rporec_jax import config as C
    from rporec_jax.models.decoder_config import DecoderConfig

    m = cfg.backbone
    path = m.path or "HuggingFaceTB/SmolLM2-135M-Instruct"
    extra = dict(dtype=m.dtype, param_dtype=m.param_dtype or m.dtype, remat=m.remat, scan_unroll=m.scan_unroll)
    if path != C.TINY_RANDOM and m.path:
        try:
            local = Path(C.resolve_backbone_path(cfg))
            if (local / "config.json").exists():
                from transformers import AutoConfig
                return DecoderConfig.from_hf(AutoConfig.from_pretrained(str(local)), **extra), str(local)
        except FileNotFoundError:
            pass
    key = next((k for k in BACKBONES if k == path or k.split("/")[-1] == Path(path).stem.split(".")[0]), None)
    if key is None:
        raise PlanError(f"backbone.path={path!r}: no local config.json and no built-in shapes; built-in: "
                        f"{', '.join(BACKBONES)}")
    return DecoderConfig(**BACKBONES[key], **extra), f"built-in shapes of {key}"


def _abstract_state(params: dict, trainable: tuple, tx, mesh: Mesh):
    """Returns an abstract TrainState placed as the run places it (`attach_optimizer`'s moment shardings)."""
    from rporec_jax.train.state import TrainState, optimizer_shardings

    train = {k: params[k] for k in trainable}
    shardings = optimizer_shardings(tx, train, jax.tree_util.tree_map(lambda x: x.sharding, train), mesh)
    opt = _abstract(jax.eval_shape(tx.init, train), shardings)
    return TrainState(_sds((), jnp.int32, shd.replicated(mesh)), params, opt, _key(mesh), trainable, tx)


def build_programs(cfg, mesh: Mesh, num_items: int) -> list[Program]:
    """Returns every jitted program of the run `cfg` on `mesh`, with abstract inputs of the run's shapes."""
    from rporec_jax import config as C
    from rporec_jax.eval import _items_sharding, _scores_sharding, _vector_ranks
    from rporec_jax.models.loading import Model, abstract_params
    from rporec_jax.models.rechead import init_rechead
    from rporec_jax.sampling import Sampler, SamplingConfig
    from rporec_jax.train.stage1 import stage1_step_fn
    from rporec_jax.train.stage2 import policy_update

    import flax.linen as nn

    dcfg, _ = decoder_config(cfg)
    strategy = cfg.strategy
    rep = shd.replicated(mesh)
    multiple = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    round_up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    boxed = abstract_params(dcfg)
    try:
        p_shard = shd.tree_shardings(boxed, mesh, strategy)
    except ValueError as e:
        raise PlanError(f"strategy {strategy!r} on mesh {dict(mesh.shape)}: {e}") from None
    policy = _abstract(nn.unbox(boxed), p_shard)
    progs = []

    def sampler_program(name, dtype, batch, bucket, new_tokens, samples, entropies, temperature, top_p, top_k):
        c = dcfg.replace(dtype=dtype or dcfg.dtype, param_dtype=dtype or dcfg.param_dtype)
        model = Model(c, None, None, mesh=mesh, strategy=strategy)
        sc = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            num_samples=samples, prompt_buckets=(bucket,), return_entropies=entropies)
        sampler = Sampler(model, sc, stop_ids=[0])
        fn, params = sampler._fn, _abstract(nn.unbox(abstract_params(c)), sampler.param_shardings)
        rows = round_up(batch)
        bs = shd.batch_sharding(mesh)
        args = (params, _sds((rows, bucket), jnp.int32, bs), _sds((rows, bucket), bool, bs), _key(mesh))
        held = "" if sampler.strategy == strategy else f", weights held as {sampler.strategy}"
        progs.append(Program(name, fn, args, f"{rows} prompts x {samples} samples, prompt {bucket} + "
                                              f"{new_tokens} new tokens, {c.dtype}{held}"))

    if "cot" in cfg.stages:
        cot = cfg.cot
        sampler_program("cot_sampler", cot.teacher_dtype, cot.batch_size, max(cot.prompt_buckets),
                        cot.max_new_tokens, cot.num_samples, False, cot.temperature, cot.top_p, cot.top_k)
    s2 = cfg.stage2
    if "stage2" in cfg.stages:
        sampler_program("rollout_sampler", "", s2.batch_size, max(s2.prompt_buckets), s2.max_new_tokens,
                        s2.num_samples, True, s2.temperature, s2.top_p, s2.top_k)

    # the Rechead and the item matrix (stage 1, scoring, GRPO's frozen reward model)
    enc_vocab, enc_dim = ENCODERS.get(cfg.encoder.path, (30522, cfg.rechead.dim))
    head = cfg.rechead
    if head.variant == "hidden_state" and head.input_dim == 0:
        head = dataclasses.replace(head, input_dim=dcfg.hidden_size)
    head = C.resolve_rechead(head, enc_vocab, enc_dim or head.dim) if head.variant != "hidden_state" else head
    from rporec_jax.train.features import DEFAULT_MAX_LENS

    lens = DEFAULT_MAX_LENS
    example = {f"{n}_{s}": np.zeros((2, lens[n]), np.int32 if s == "ids" else bool)
               for n in ("prompt", "cot", "answer") for s in ("ids", "mask")}
    example["format"] = np.zeros((2,), np.int32)
    if head.variant == "hidden_state":
        example = {"hidden": np.zeros((2, head.input_dim), np.float32)}
    head_boxed = jax.eval_shape(lambda: init_rechead(head, jax.random.key(0), example))
    head_params = _abstract(nn.unbox(head_boxed), shd.tree_shardings(head_boxed, mesh, strategy))
    rules = shd.logical_rules(strategy)
    items_multiple = int(np.prod([mesh.shape[a] for a in np.atleast_1d(dict(rules).get("items") or [])], dtype=int))
    rows_items = -(-(num_items + 1) // items_multiple) * items_multiple
    items = _sds((rows_items, head.dim), jnp.float32,
                 shd.logical_to_sharding(P("items", None), (rows_items, head.dim), mesh, rules, "item_matrix"))
    k = cfg.data.num_negatives

    def batch_of(rows):
        bs = lambda nd: shd.batch_sharding(mesh, nd)  # noqa: E731
        b = {name: _sds((rows,) + x.shape[1:], x.dtype, bs(x.ndim)) for name, x in example.items()}
        b.update(target=_sds((rows,), jnp.int32, bs(1)), negatives=_sds((rows, k), jnp.int32, bs(2)),
                 valid=_sds((rows,), bool, bs(1)))
        return b

    if "stage1" in cfg.stages:
        state = _abstract_state({"rechead": head_params, "items": items}, ("rechead",),
                                cfg.stage1.optim.make(), mesh)
        st_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        batch = batch_of(round_up(cfg.stage1.batch_size))
        fn = jax.jit(stage1_step_fn(head), in_shardings=(st_sh, jax.tree_util.tree_map(lambda x: x.sharding, batch)),
                     out_shardings=(st_sh, rep), donate_argnums=0)
        progs.append(Program("stage1_step", fn, (state, batch), f"{round_up(cfg.stage1.batch_size)} instances x "
                                                                f"(1 + {k}) candidates, {head.variant}"))
    if "eval" in cfg.stages or "stage1" in cfg.stages:
        rows = round_up(256)
        scores = _scores_sharding(mesh, strategy)
        users = _sds((rows, head.dim), jnp.float32, NamedSharding(mesh, P(scores.spec[0], None)))
        ranked = _sds((rows_items, head.dim), jnp.float32,
                      _items_sharding((rows_items, head.dim), mesh, strategy) or rep)
        targets = _sds((rows,), jnp.int32, NamedSharding(mesh, P(scores.spec[0])))
        fn = jax.jit(lambda u, m, t: _vector_ranks(u, m, t, None, num_items=num_items, scores_sharding=scores))
        progs.append(Program("rechead_scoring", fn, (users, ranked, targets),
                             f"{rows} users x {num_items} items, full ranking"))
    if "stage2" in cfg.stages:
        ref_dtype = s2.reference_dtype or None
        reference = policy if ref_dtype is None else jax.tree_util.tree_map(
            lambda x: _sds(x.shape, ref_dtype, x.sharding), policy)
        state = _abstract_state({"rechead": head_params, "items": items, "policy": policy, "reference": reference},
                                ("policy",), s2.optim.make(), mesh)
        st_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
        rows = s2.batch_size * s2.num_samples
        if (rows // s2.micro_batches) % multiple:  # the trainer's own check, before compiling anything
            raise PlanError(f"stage 2: {rows} rows / {s2.micro_batches} micro-batches = {rows // s2.micro_batches} "
                            f"rows per update, not divisible by the mesh's batch size {multiple}; change "
                            "stage2.batch_size, num_samples or micro_batches")
        plen, n = max(s2.prompt_buckets), s2.max_new_tokens
        bs = lambda nd: shd.batch_sharding(mesh, nd)  # noqa: E731
        batch = {"prompt_tokens": _sds((rows, plen), jnp.int32, bs(2)), "prompt_mask": _sds((rows, plen), bool, bs(2)),
                 "tokens": _sds((rows, n), jnp.int32, bs(2)), "mask": _sds((rows, n), bool, bs(2)),
                 "entropies": _sds((rows, n), jnp.float32, bs(2)), "advantages": _sds((rows,), jnp.float32, bs(1))}
        if s2.use_rollout_logprobs:
            batch["old_logp"] = _sds((rows, n), jnp.float32, bs(2))
        model = Model(dcfg, None, None, mesh=mesh, strategy=strategy)
        fn = jax.jit(lambda s, b: policy_update(model, s2, s, b),
                     in_shardings=(st_sh, jax.tree_util.tree_map(lambda x: x.sharding, batch)),
                     out_shardings=(st_sh, rep), donate_argnums=0)
        progs.append(Program("grpo_update", fn, (state, batch), f"{rows} rows, prompt {plen} + completion {n}, "
                                                                f"{s2.micro_batches} micro-batch(es), remat "
                                                                f"{dcfg.remat}"))
    if "eval" in cfg.stages and "sasrec" in cfg.eval.baselines:
        progs.append(_sasrec_program(cfg, mesh, num_items, round_up))
    return progs


def _sasrec_program(cfg, mesh, num_items, round_up) -> Program:
    import optax

    from rporec_jax.baselines.sasrec import SASRecConfig, _model, _train_step, rbg_key

    sc = SASRecConfig(epochs=cfg.eval.sasrec_epochs)
    window = cfg.data.split.window
    model = _model(num_items, sc.max_len or window, sc)
    rep = shd.replicated(mesh)
    shapes = jax.eval_shape(lambda: model.init(rbg_key(jax.random.key(0)), jnp.zeros((1, window), jnp.int32),
                                               jnp.ones((1,), jnp.int32)))
    params = jax.tree_util.tree_map(lambda x: _sds(x.shape, x.dtype, rep), shapes)
    opt = jax.tree_util.tree_map(lambda x: _sds(x.shape, x.dtype, rep),
                                 jax.eval_shape(optax.adam(sc.learning_rate).init, shapes))
    rows = round_up(sc.batch_size)
    batch = {"history": _sds((rows, window), jnp.int32, shd.batch_sharding(mesh)),
             "history_len": _sds((rows,), jnp.int32, shd.batch_sharding(mesh, 1)),
             "target": _sds((rows,), jnp.int32, shd.batch_sharding(mesh, 1))}
    key = jax.eval_shape(lambda: rbg_key(jax.random.key(0)))
    fn = jax.jit(lambda p, o, b, k: _train_step(p, o, b, k, model=model, num_negatives=sc.num_negatives,
                                                learning_rate=sc.learning_rate))
    return Program("sasrec_step", fn, (params, opt, batch, _sds(key.shape, key.dtype, rep)),
                   f"{rows} sequences x {window} items, {num_items} items")


# --------------------------------------------------------------------------------------------------------------
# The plan of a run
# --------------------------------------------------------------------------------------------------------------

def num_items_of(cfg) -> int:
    """Returns the catalogue size: the prepared dataset's when it is here, else a nominal size per source."""
    return NOMINAL_ITEMS.get(type(cfg.data.source).__name__, 10000)


def plan(cfg, topology: str, num_items: Optional[int] = None, programs: Optional[list[str]] = None,
         log: Callable[[str], None] = lambda s: None) -> dict:
    """Returns the plan of run config `cfg` on `topology`: {'topology', 'chip', 'mesh', 'strategy', 'rows'}."""
    devices = topology_devices(topology)
    chip = chip_of(devices[0])
    try:
        mesh = shd.make_mesh(cfg.mesh, devices=devices)
    except ValueError as e:
        raise PlanError(f"mesh {cfg.mesh} on {topology} ({len(devices)} devices): {e}; set mesh.data/fsdp/tp "
                        "so their product is the device count (one may be -1)") from None
    n_items = num_items or num_items_of(cfg)
    dcfg, source = decoder_config(cfg)
    progs = build_programs(cfg, mesh, n_items)
    if programs:
        unknown = sorted(set(programs) - {p.name for p in progs})
        if unknown:
            raise PlanError(f"programs {unknown} are not in this run; it has {[p.name for p in progs]}")
        progs = [p for p in progs if p.name in programs]
    rows = []
    for p in progs:
        log(f"compiling {p.name} ({p.note}) for {topology} ...")
        rows.append(analyse(p, chip))
        r = rows[-1]
        log(f"  {r['compile_s']} s: peak {r['peak_bytes'] / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.0f} GiB, "
            f"{'fits' if r['fits'] else 'DOES NOT FIT'}")
    return {"config": cfg.name, "topology": topology, "devices": len(devices),
            "hosts": len({d.process_index for d in devices}), "chip": dataclasses.asdict(chip),
            "mesh": dict(mesh.shape), "strategy": cfg.strategy if isinstance(cfg.strategy, str) else "custom",
            "backbone": source, "backbone_params": int(sum(math.prod(x.shape) for x in
                                                            jax.tree_util.tree_leaves(_param_shapes(dcfg)))),
            "num_items": n_items, "rows": rows, "fits": all(r["fits"] for r in rows)}


def _param_shapes(dcfg):
    import flax.linen as nn

    from rporec_jax.models.loading import abstract_params
    return nn.unbox(abstract_params(dcfg))


def _fmt_bytes(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 1024 ** 2:.1f} MiB"


def markdown(report: dict) -> str:
    """Returns the plan as a markdown table with the verdicts and, for programs that do not fit, the buffers."""
    chip = report["chip"]
    lines = [f"# Plan: {report['config']} on {report['topology']} ({report['devices']} devices, {report['hosts']} "
             f"host(s), mesh {report['mesh']}, strategy {report['strategy']})", "",
             f"Backbone: {report['backbone']} ({report['backbone_params'] / 1e6:.0f}M parameters); "
             f"{report['num_items']} items. Per device: {chip['name']}, {chip['hbm_bytes'] / GiB:.0f} GiB HBM, "
             f"{chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bw'] / 1e9:.0f} GB/s HBM, "
             f"{chip['ici_bw'] / 1e9:.0f} GB/s ICI ({chip['source']}).", "",
             "| program | args | temp | peak / HBM | fits | TFLOP | HBM GB | collective GB | est. time | bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['program']} | {_fmt_bytes(r['argument_bytes'])} | {_fmt_bytes(r['temp_bytes'])} | "
                     f"{_fmt_bytes(r['peak_bytes'])} ({100 * r['peak_bytes'] / r['hbm_bytes']:.0f}%) | "
                     f"{'yes' if r['fits'] else '**no**'} | {r['flops'] / 1e12:.3f} | "
                     f"{r['bytes_accessed'] / 1e9:.2f} | "
                     f"{r['collective_bytes'] / 1e9:.3f} | {_fmt_time(r['time_s'])} | {r['bound']} |")
    lines += ["", "Shapes: " + "; ".join(f"{r['program']}: {r['note']}" for r in report["rows"]), "",
              "Collectives per step (count, GB): " + "; ".join(
                  f"{r['program']}: " + ", ".join(f"{k} {v['count']} ({v['bytes'] / 1e9:.3f})"
                                                  for k, v in r["collectives"].items()) for r in report["rows"]
                  if r["collectives"])]
    for r in report["rows"]:
        if not r["fits"]:
            lines += ["", f"**{r['program']} does not fit**: peak {_fmt_bytes(r['peak_bytes'])} per device vs "
                          f"{_fmt_bytes(r['hbm_bytes'])}. Largest arguments: " + ", ".join(
                              f"{a['path']} {_fmt_bytes(a['bytes'])}" for a in r["largest_arguments"])
                      + ". Largest buffers: " + ", ".join(f"{t['op']} {_fmt_bytes(t['bytes'])}"
                                                          for t in r["largest_temporaries"])]
    lines += ["", "FLOPs are matmul FLOPs of the optimised HLO with every while loop (layer scan, decode loop) "
                  "counted by its trip count; HBM bytes count each top-level op's operands and outputs; the "
                  "estimated time is the largest of FLOPs / peak, bytes / HBM bandwidth and collective bytes / "
                  "ICI bandwidth (a roofline bound, not a measurement). Sampler loops count their full budget "
                  "of new tokens."]
    return "\n".join(lines) + "\n"


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def write(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Writes plan.json and plan.md into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(report, indent=1))
    (out / "plan.md").write_text(markdown(report))
    return out / "plan.json", out / "plan.md"


# --------------------------------------------------------------------------------------------------------------
# Pre-flight on real accelerators
# --------------------------------------------------------------------------------------------------------------

PREFLIGHT_PROGRAMS = ("cot_sampler", "rollout_sampler", "grpo_update")


def preflight(cfg, mesh: Mesh, capacity: Optional[int] = None, force: bool = False) -> list[str]:
    """Returns one message per program of the run that will not fit its devices' memory (empty: all fit).

    On an accelerator (or with `force`), compiles the samplers and the GRPO update for the run's own mesh before
    any heavy stage, so a run that would go out of memory stops before an hour of CoT generation. `capacity`:
    bytes per device (default: the device's reported limit, else the chip table's HBM)."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu" and not force:
        return []
    if capacity is None:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        capacity = (stats or {}).get("bytes_limit") or CHIPS.get(device.device_kind, Chip("", 0, 1, 1, 1, "")).hbm_bytes
    if not capacity:
        return []
    chip = Chip(device.device_kind, int(capacity), 1.0, 1.0, 1.0, "the device's memory limit")
    problems = []
    for p in build_programs(cfg, mesh, num_items_of(cfg)):
        if p.name not in PREFLIGHT_PROGRAMS:
            continue
        r = analyse(p, chip)
        if not r["fits"]:
            buffers = ", ".join(f"{t['op']} {_fmt_bytes(t['bytes'])}" for t in r["largest_temporaries"][:3])
            problems.append(f"{p.name} ({p.note}) needs {_fmt_bytes(r['peak_bytes'])} per device, the devices "
                            f"have {_fmt_bytes(capacity)}; largest buffers: {buffers}. Lower the batch or "
                            f"lengths, add micro-batches, or shard more (python -m rporec_jax.launch plan)")
    return problems
