"""Configuration: every error names its field path; YAML round trips are lossless; plugin options are
validated against their attrs class; ``sagellm config`` prints and validates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_core.cli import main
from sagellm_core.cli import config_cmd
from sagellm_core.config import (
    DTYPES,
    BackendConfig,
    BenchmarkConfig,
    EngineConfig,
    FieldError,
    KVCacheConfig,
    MetricsConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    at_least,
    structure_options,
)
from sagellm_core.errors import ConfigError
from sagellm_core.hookspecs import hookimpl
from sagellm_core.plugin_manager import create_plugin_manager


# ---- error paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "message"), [
    ({"scheduler": {"max_num_seqs": 0}}, "scheduler.max_num_seqs: must be >= 1, got 0"),
    ({"kv_cache": {"memory_utilization": 0}}, "kv_cache.memory_utilization: must be in (0.0, 1.0], got 0.0"),
    ({"server": {"port": 70000}}, "server.port: must be in [0, 65535], got 70000"),
    ({"model": {"dtype": "fp8"}}, "model.dtype: must be one of auto, float32, float16, bfloat16; got 'fp8'"),
    ({"model": {"max_model_len": 0}}, "model.max_model_len: must be >= 1, got 0"),
    ({"backend": {"device_index": -1}}, "backend.device_index: must be >= 0, got -1"),
], ids=lambda v: "" if isinstance(v, str) else next(iter(v)))
def test_validator_errors_name_the_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict(data)
    assert str(info.value) == message


@pytest.mark.parametrize(("data", "message"), [
    ({"bogus": 1}, "bogus: unknown key"),
    ({"scheduler": {"max_num_seq": 4}}, "scheduler.max_num_seq: unknown key"),
    ({"kv_cache": {"policy": "prefix_lru", "polcy_options": {}}}, "kv_cache.polcy_options: unknown key"),
])
def test_unknown_keys_name_the_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict(data)
    assert str(info.value) == message


@pytest.mark.parametrize(("data", "path"), [
    ({"scheduler": {"max_num_seqs": "lots"}}, "scheduler.max_num_seqs: "),
    ({"kv_cache": {"memory_utilization": "most"}}, "kv_cache.memory_utilization: "),
    ({"metrics": {"percentiles": [50, "p99"]}}, "metrics.percentiles[1]: "),
    ({"scheduler": 5}, "scheduler: "),
    ({"scheduler": {"options": [1, 2]}}, "scheduler.options: "),
    ({"model": {"max_model_len": None, "seed": None}}, "model.seed: "),
])
def test_bad_types_name_the_path(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict(data)
    assert str(info.value).startswith(path)


def test_several_bad_fields_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict({"scheduler": {"max_num_seqs": "x"}, "kv_cache": {"block_size": "y"}})
    lines = sorted(str(info.value).splitlines())
    assert [line.split(":")[0] for line in lines] == ["kv_cache.block_size", "scheduler.max_num_seqs"]


@pytest.mark.parametrize(("data", "path"), [
    ({"scheduler": {"chunked_prefill": "no"}}, "scheduler.chunked_prefill: "),  # bool("no") is True
    ({"scheduler": {"max_num_seqs": 1.7}}, "scheduler.max_num_seqs: "),  # int(1.7) is 1
    ({"scheduler": {"max_num_seqs": True}}, "scheduler.max_num_seqs: "),
    ({"model": {"path": 5}}, "model.path: "),
])
def test_lossy_coercions_are_rejected(data: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_dict(data)
    assert str(info.value).startswith(path)


def test_yaml_that_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match="config must be a mapping at the top level, got list"):
        EngineConfig.from_yaml("- a\n- b\n")
    with pytest.raises(ConfigError, match="^invalid YAML: "):
        EngineConfig.from_yaml("scheduler: [unclosed\n")


def test_evolve_merges_sections_and_validates() -> None:
    config = EngineConfig().evolve(scheduler={"max_num_seqs": 4})
    assert config.scheduler == attrs.evolve(SchedulerConfig(), max_num_seqs=4)
    with pytest.raises(ConfigError, match=r"^scheduler\.max_num_seqs: must be >= 1, got 0$"):
        config.evolve(scheduler={"max_num_seqs": 0})


# ---- round trip -----------------------------------------------------------------------------------
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | finite | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
options = st.dictionaries(text, json_value, max_size=3)
positive = st.integers(1, 2**40)

configs = st.builds(
    EngineConfig,
    model=st.builds(ModelConfig, path=st.none() | text, tokenizer=st.none() | text,
                    dtype=st.sampled_from(DTYPES), max_model_len=st.none() | positive, seed=st.integers(0, 2**63)),
    kv_cache=st.builds(KVCacheConfig, block_size=positive, num_blocks=st.none() | positive,
                       memory_utilization=st.floats(0, 1, exclude_min=True),
                       cpu_memory_bytes=st.integers(1 << 20, 1 << 50), policy=text, policy_options=options),
    scheduler=st.builds(SchedulerConfig, name=text, max_num_seqs=positive, max_num_batched_tokens=positive,
                        max_waiting=positive, chunked_prefill=st.booleans(), options=options),
    backend=st.builds(BackendConfig, name=text, device_index=st.integers(0, 64), cuda_graphs=st.booleans(),
                      max_graph_batch_size=positive),
    metrics=st.builds(MetricsConfig, enabled=st.lists(text, max_size=4), percentiles=st.lists(finite, max_size=4)),
    benchmark=st.builds(BenchmarkConfig, num_requests=positive, min_input_len=positive, seed=st.integers(0, 2**31)),
    server=st.builds(ServerConfig, host=text, port=st.integers(0, 65535), served_model_name=st.none() | text),
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_yaml_round_trip_is_lossless(config: EngineConfig) -> None:
    assert EngineConfig.from_yaml(config.to_yaml()) == config
    assert EngineConfig.from_dict(config.to_dict()) == config


def test_defaults_round_trip_and_special_floats() -> None:
    config = EngineConfig(metrics=MetricsConfig(percentiles=[1e17, -0.0, math.inf, 5e-324]))
    again = EngineConfig.from_yaml(config.to_yaml())
    assert again == config and math.copysign(1, again.metrics.percentiles[1]) == -1
    assert EngineConfig.from_yaml(EngineConfig().to_yaml()) == EngineConfig()
    assert EngineConfig.from_yaml("") == EngineConfig()


# ---- plugin options -------------------------------------------------------------------------------
@attrs.frozen
class Window:
    depth: int = attrs.field(default=4, validator=at_least(1))


@attrs.frozen
class DemoOptions:
    aging: float = attrs.field(default=1.0, validator=at_least(0.0))
    window: Window = attrs.field(factory=Window)


def test_structure_options_builds_the_class() -> None:
    assert structure_options(DemoOptions, {}, "scheduler.options") == DemoOptions()
    assert structure_options(DemoOptions, {"aging": 2, "window": {"depth": 8}}, "scheduler.options") == \
        DemoOptions(2.0, Window(8))


@pytest.mark.parametrize(("data", "message"), [
    ({"aging": -1}, "scheduler.options.aging: must be >= 0.0, got -1.0"),
    ({"agin": 1}, "scheduler.options.agin: unknown key"),
    ({"window": {"depth": 0}}, "scheduler.options.window.depth: must be >= 1, got 0"),
    ({"window": {"dept": 2}}, "scheduler.options.window.dept: unknown key"),
])
def test_structure_options_errors_name_the_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        structure_options(DemoOptions, data, "scheduler.options")
    assert str(info.value) == message


def test_plugin_without_options_class() -> None:
    assert structure_options(None, {}, "kv_cache.policy_options") == {}
    with pytest.raises(ConfigError, match=r"^kv_cache\.policy_options: this plugin takes no options, got a, b$"):
        structure_options(None, {"b": 1, "a": 2}, "kv_cache.policy_options")


def test_field_error_is_a_value_error() -> None:
    assert issubclass(FieldError, ValueError)


# ---- sagellm config -------------------------------------------------------------------------------
class DemoSchedulerPlugin:
    @hookimpl
    def sagellm_register_schedulers(self, register: Any) -> None:
        register("demo", lambda config, options=None: None, options=DemoOptions)


@pytest.fixture
def demo_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sagellm config --validate` sees the built-ins plus a scheduler ``demo`` with options."""
    monkeypatch.setattr(config_cmd, "create_plugin_manager",
                        lambda: create_plugin_manager(entry_points=False, extra={"demo": DemoSchedulerPlugin()}))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_config_prints_defaults_as_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == EngineConfig().to_dict()
    assert EngineConfig.from_yaml(out) == EngineConfig()


@pytest.mark.usefixtures("demo_plugins")
def test_config_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "scheduler:\n  name: demo\n  options: {aging: 0.5, window: {depth: 2}}\n")
    assert main(["config", "--validate", path]) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"


@pytest.mark.usefixtures("demo_plugins")
@pytest.mark.parametrize(("text", "errors"), [
    ("scheduler:\n  max_num_seqs: 0\n", ["scheduler.max_num_seqs: must be >= 1, got 0"]),
    ("scheduler:\n  name: demo\n  options: {window: {depth: 0}}\n",
     ["scheduler.options.window.depth: must be >= 1, got 0"]),
    ("scheduler: {name: fcfs, options: {x: 1}}\n", ["scheduler.options: this plugin takes no options, got x"]),
    ("scheduler: {name: lifo}\nkv_cache: {policy: belady}\nbackend: {name: tpu}\nmetrics: {enabled: [latency, p99]}\n", [
        "scheduler.name: unknown scheduler 'lifo'; registered: demo, fcfs, ",
        "kv_cache.policy: unknown kv_policy 'belady'; registered: ",
        "backend.name: unknown backend 'tpu'; registered: cpu",
        "metrics.enabled[1]: unknown metric 'p99'; registered: ",
    ]),
    ("- just\n- a list\n", ["config must be a mapping at the top level, got list"]),
])
def test_config_validate_reports_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                       errors: list[str]) -> None:
    path = write(tmp_path, text)
    assert main(["config", "--validate", path]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"{path}: invalid configuration" and len(lines) == len(errors) + 1
    for line, error in zip(lines[1:], errors):  # registered names beyond those shown may grow
        assert line.startswith(f"  {error}")


def test_config_validate_without_plugins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "scheduler: {name: not_installed_anywhere}\n")
    assert main(["config", "--validate", path, "--no-plugins"]) == 0
    assert capsys.readouterr().out == f"{path}: OK\n"


def test_config_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "nope.yaml")
    assert main(["config", "--validate", path]) == 2
    assert f"$: cannot read {path}: No such file or directory" in capsys.readouterr().err


# ---- environment variables ---------------------------------------------------------------------------
def test_every_field_is_settable_from_the_environment() -> None:
    from sagellm_core.config import load_config

    environ = {
        "SAGELLM_SCHEDULER__MAX_NUM_SEQS": "256",
        "SAGELLM_SCHEDULER__OPTIONS__MODE": "strict",
        "SAGELLM_MODEL__PATH": "no",  # a string field keeps the text (YAML would read "no" as false)
        "SAGELLM_MODEL__MAX_MODEL_LEN": "4096",
        "SAGELLM_KV_CACHE__MEMORY_UTILIZATION": "0.5",
        "SAGELLM_METRICS__ENABLED": "[latency, kv]",
        "SAGELLM_BACKEND__CUDA_GRAPHS": "false",
        "SAGELLM_BACKEND": "cuda",  # no double underscore: not a config field, left alone
        "SAGELLM_FUSED_SAMPLING": "0",
    }
    config = load_config(None, environ)
    assert (config.scheduler.max_num_seqs, config.scheduler.options) == (256, {"mode": "strict"})
    assert (config.model.path, config.model.max_model_len) == ("no", 4096)
    assert config.kv_cache.memory_utilization == 0.5 and config.metrics.enabled == ["latency", "kv"]
    assert config.backend.cuda_graphs is False and config.backend.name == "auto"


def test_environment_overrides_the_file_and_errors_name_path_and_variable(tmp_path: Path) -> None:
    from sagellm_core.config import load_config

    path = write(tmp_path, "scheduler: {max_num_seqs: 8, max_waiting: 9}\n")
    config = load_config(path, {"SAGELLM_SCHEDULER__MAX_NUM_SEQS": "4"})
    assert (config.scheduler.max_num_seqs, config.scheduler.max_waiting) == (4, 9)
    for variable, value, error in (
        ("SAGELLM_SCHEDULER__MAX_NUM_SEQS", "0", "scheduler.max_num_seqs: must be >= 1, got 0"),
        ("SAGELLM_SCHEDULER__MAX_NUM_SEQS", "many", "scheduler.max_num_seqs: expected int, got str 'many'"),
        ("SAGELLM_SCHEDULR__MAX_NUM_SEQS", "4", "schedulr: unknown key"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(path, {variable: value})
        assert str(info.value).splitlines()[0] == error and variable in str(info.value)


# ---- validators for plugin options ------------------------------------------------------------------
def test_with_path_keeps_the_field_name_of_stock_attrs_validators() -> None:
    from sagellm_core.options import at_least, one_of, with_path

    @attrs.frozen
    class Options:
        ratio: float = attrs.field(default=0.5, validator=with_path(attrs.validators.le(1.0)))
        depth: int = attrs.field(default=1, validator=at_least(1))
        mode: str = attrs.field(default="a", validator=one_of("a", "b"))

    assert structure_options(Options, {"ratio": 1.0}, "x.options") == Options(ratio=1.0)
    with pytest.raises(ConfigError, match=r"^x\.options\.ratio: 'ratio' must be <= 1\.0: 2\.0$"):
        structure_options(Options, {"ratio": 2.0}, "x.options")
    with pytest.raises(ConfigError, match=r"^x\.options\.mode: must be one of a, b; got 'c'$"):
        structure_options(Options, {"mode": "c"}, "x.options")


def test_metrics_extra_extends_and_enabled_replaces() -> None:
    assert MetricsConfig().sinks() == ["latency", "throughput", "kv"]
    assert MetricsConfig(extra=["prometheus", "kv"]).sinks() == ["latency", "throughput", "kv", "prometheus"]
    assert MetricsConfig(enabled=["kv"], extra=["latency"]).sinks() == ["kv", "latency"]
