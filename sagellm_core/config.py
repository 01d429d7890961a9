"""Engine configuration: frozen attrs classes per section, (de)serialised through one strict cattrs converter.

Every error names its field path, e.g. ``scheduler.max_num_seqs: must be >= 1, got 0``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from sagellm_core.errors import ConfigError
from sagellm_core.options import FieldError, at_least, in_range, one_of

__all__ = [
    "BackendConfig", "BenchmarkConfig", "ConfigError", "EngineConfig", "FieldError", "KVCacheConfig", "KVTiersConfig",
    "MetricsConfig", "ModelConfig", "SchedulerConfig", "ServerConfig", "at_least", "in_range", "load_config",
    "one_of", "structure", "structure_options",
]

T = TypeVar("T")


DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("auto", "none", "int8", "int4", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")


@attrs.frozen
class ModelConfig:
    """Which model to run. ``path`` None means the embedded default (SmolLM2-135M-Instruct).

    ``path``: a local directory (safetensors), a ``.gguf`` file, or a hub id found in the offline HF
    cache. ``load_format="dummy"`` initialises random weights from the config (benchmarks).
    ``quantization``: weight format of the linear layers (`sagellm_core.quant`): ``auto`` runs a GGUF
    model in its own quantization on the CPU backend (with ``dtype: auto``) and unquantized elsewhere;
    ``int8`` / ``int4`` weight-only, ``fp8`` (E4M3 weights and activations, CUDA), ``none``.
    """

    path: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = attrs.field(default="auto", validator=one_of(*DTYPES))
    max_model_len: int | None = attrs.field(default=None, validator=at_least(1))
    seed: int = 0
    load_format: str = attrs.field(default="auto", validator=one_of("auto", "dummy"))
    quantization: str = attrs.field(default="auto", validator=one_of(*QUANTIZATIONS))


@attrs.frozen
class KVCacheConfig:
    """Paged KV pool: block size, pool size (explicit or from memory) and the reuse/eviction policy.

    ``dtype``: ``auto`` stores K/V in the model dtype; ``fp8`` in float8 E4M3 (scale 1.0, saturating),
    half the bytes of bf16 per block.
    """

    block_size: int = attrs.field(default=16, validator=at_least(1))
    num_blocks: int | None = attrs.field(default=None, validator=at_least(1))
    memory_utilization: float = attrs.field(default=0.9, validator=in_range(0.0, 1.0, low_open=True))
    cpu_memory_bytes: int = attrs.field(default=2 << 30, validator=at_least(1 << 20))
    policy: str = "prefix_lru"
    policy_options: dict[str, Any] = attrs.field(factory=dict)
    dtype: str = attrs.field(default="auto", validator=one_of(*KV_CACHE_DTYPES))


FALLBACK_MAX_NUM_SEQS = 128
FALLBACK_MAX_NUM_BATCHED_TOKENS = 2048
"""Budgets of a scheduler built from an unresolved config outside an engine (and the CPU's)."""


@attrs.frozen
class KVTiersConfig:
    """Tiers under the device KV pool (`sagellm_core.kv.tiers`): prefix blocks the pool evicts move
    down, and a prefix hit continues down the tiers after the pool misses.

    ``host_bytes``: size of the host-memory tier (pinned on CUDA; 0: none). ``disk_path``: directory
    of the disk tier (None: none); its blocks survive restarts, in a sub-directory per fingerprint of
    the model weights and KV layout; ``disk_bytes`` caps it. ``write_mode``: ``back`` copies a block
    down when the pool evicts it, ``through`` as soon as it is a full cached block. ``extra``: tiers
    registered by plugins (`sagellm_register_kv_tiers`), below the built-in ones, in order, with their
    options in ``options.<name>``. ``load_gate``: a prefix block found on a tier is loaded only while
    the tier's measured load time per block stays within 4x the engine's measured prefill time per
    block (`sagellm_core.kv.tiers.gate`); false: always load.
    """

    host_bytes: int = attrs.field(default=0, validator=at_least(0))
    disk_path: str | None = None
    disk_bytes: int = attrs.field(default=16 << 30, validator=at_least(1 << 20))
    write_mode: str = attrs.field(default="back", validator=one_of("back", "through"))
    extra: list[str] = attrs.field(factory=list)
    options: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    load_gate: bool = True

    def names(self) -> list[str]:
        """The tiers in use, top first."""
        builtin = (["host"] if self.host_bytes else []) + (["disk"] if self.disk_path else [])
        return list(dict.fromkeys([*builtin, *self.extra]))


@attrs.frozen
class SchedulerConfig:
    """Scheduler plugin and budgets per step.

    ``async_scheduling``: queue step N+1 on the device before reading step N's sampled tokens, so
    the host's scheduling and input preparation hide behind device work (vLLM's async scheduling).
    ``auto``: on where the backend copies asynchronously (CUDA), off on the CPU. Steps with
    structured outputs need the tokens on the host and run synchronously (penalties, logprobs and
    every other sampling parameter stay asynchronous). A request that ends (EOS, stop) has one extra
    token computed and dropped.

    ``max_num_seqs`` / ``max_num_batched_tokens``: null (the default) derives them from the
    backend and its memory when the engine starts (`sagellm_core.engine.budgets`): 512 / 16384 on
    a GPU of 70 GiB or more, down to 128 / 2048 on the CPU; values given explicitly win.

    ``overlap_output``: without async scheduling, for batches of 8+ sequences, detokenize and emit
    a step's outputs while the device runs the next step (outputs arrive one step later).
    """

    name: str = "fcfs"
    max_num_seqs: int | None = attrs.field(default=None, validator=at_least(1))
    max_num_batched_tokens: int | None = attrs.field(default=None, validator=at_least(1))
    max_waiting: int = attrs.field(default=4096, validator=at_least(1))
    chunked_prefill: bool = True
    async_scheduling: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))
    overlap_output: bool = True
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class BackendConfig:
    """Device backend: ``auto`` picks by priority; ``SAGELLM_BACKEND`` overrides ``auto``.

    ``options``: validated against the options class the selected backend registered (if any).
    ``cuda_graphs``: capture decode steps as device graphs at start-up, for every batch bucket up to
    ``max_graph_batch_size`` (null: ``scheduler.max_num_seqs``, at most 512); false (the CLI's
    ``--enforce-eager``) runs every step eagerly.
    """

    name: str = "auto"
    device_index: int = attrs.field(default=0, validator=at_least(0))
    cuda_graphs: bool = True
    max_graph_batch_size: int | None = attrs.field(default=None, validator=at_least(1))
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class MetricsConfig:
    """Metric sinks to run and latency percentiles to report.

    ``enabled`` *replaces* the default list (so a default sink can be turned off); ``extra`` adds
    sinks to it (``extra: [jsonl]`` keeps the defaults). ``options`` maps a sink name to that sink's
    option mapping, validated against the options class its plugin registered
    (``options: {jsonl: {path: out.jsonl}}``; errors name ``metrics.options.jsonl.path``).
    """

    enabled: list[str] = attrs.field(factory=lambda: ["latency", "throughput", "kv"])
    extra: list[str] = attrs.field(factory=list)
    percentiles: list[float] = attrs.field(factory=lambda: [50.0, 90.0, 99.0])
    options: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def sinks(self) -> list[str]:
        """The sinks that run: ``enabled`` then ``extra``, each name once."""
        return list(dict.fromkeys([*self.enabled, *self.extra]))


@attrs.frozen
class BenchmarkConfig:
    """Defaults of `sagellm bench` workloads (nano-vllm's shape)."""

    num_requests: int = attrs.field(default=256, validator=at_least(1))
    min_input_len: int = attrs.field(default=100, validator=at_least(1))
    max_input_len: int = attrs.field(default=1024, validator=at_least(1))
    min_output_len: int = attrs.field(default=100, validator=at_least(1))
    max_output_len: int = attrs.field(default=1024, validator=at_least(1))
    seed: int = 0


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8000, validator=in_range(0, 65535))
    served_model_name: str | None = None


@attrs.frozen
class ParallelConfig:
    """Several devices for one engine (see `sagellm_core.parallel`).

    ``tensor_parallel_size``: shard every layer over that many devices (one process each).
    ``pd_split``: with the ``pd`` scheduler in ``strict`` mode, keep the decode pool on a second
    device (and process) and send prefilled blocks there. ``data_parallel_size``: independent engine
    replicas behind one server, requests routed by prefix affinity. ``master_addr`` /
    ``master_port`` (0: a free port) is where rank 0 listens when it starts the other ranks itself.
    """

    tensor_parallel_size: int = attrs.field(default=1, validator=at_least(1))
    data_parallel_size: int = attrs.field(default=1, validator=at_least(1))
    pd_split: bool = False
    master_addr: str = "127.0.0.1"
    master_port: int = attrs.field(default=0, validator=in_range(0, 65535))


@attrs.frozen
class EngineConfig:
    """Top-level configuration. Build with keyword sections, `from_dict`, or `from_yaml`."""

    model: ModelConfig = attrs.field(factory=ModelConfig)
    kv_cache: KVCacheConfig = attrs.field(factory=KVCacheConfig)
    kv_tiers: KVTiersConfig = attrs.field(factory=KVTiersConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    backend: BackendConfig = attrs.field(factory=BackendConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    benchmark: BenchmarkConfig = attrs.field(factory=BenchmarkConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        return structure(data or {}, cls)

    def to_dict(self) -> dict[str, Any]:
        return converter.unstructure(self)

    @classmethod
    def from_yaml(cls, text_or_path: str) -> "EngineConfig":
        """Parse YAML text, or read it from a path if ``text_or_path`` names an existing file."""
        import os

        text = text_or_path
        if "\n" not in text_or_path and os.path.exists(text_or_path):
            with open(text_or_path, encoding="utf-8") as fh:
                text = fh.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data or {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def evolve(self, **sections: Any) -> "EngineConfig":
        """Copy with some fields replaced: ``cfg.evolve(scheduler={"name": "priority"})`` merges dicts."""
        merged = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = converter.unstructure(value)
        return EngineConfig.from_dict(merged)


converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict(kind: type, accepts: tuple[type, ...], cast: Callable[[Any], Any] = lambda v: v) -> None:
    """Refuse silent coercions ("no" -> True, 1.7 -> 1, True -> 1, 5 -> "5")."""

    def structure(value: Any, _: type) -> Any:
        if isinstance(value, bool) and bool not in accepts:
            raise TypeError(f"expected {kind.__name__}, got bool")
        if not isinstance(value, accepts):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return cast(value)

    converter.register_structure_hook(kind, structure)


_strict(bool, (bool,))
_strict(int, (int,))
_strict(float, (int, float), float)
_strict(str, (str,))


def _messages(exc: BaseException, path: str) -> list[str]:
    if isinstance(exc, ClassValidationError):
        field_errors, other_errors = exc.group_exceptions()
        out: list[str] = []
        for sub, field_note in field_errors:
            out += _messages(sub, f"{path}.{field_note.name}" if path else field_note.name)
        for sub in other_errors:
            out += _messages(sub, path)
        return out
    if isinstance(exc, IterableValidationError):
        item_errors, other_errors = exc.group_exceptions()
        out = []
        for sub, item_note in item_errors:
            out += _messages(sub, f"{path}[{item_note.index}]")
        for sub in other_errors:
            out += _messages(sub, path)
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"{path + '.' if path else ''}{key}: unknown key" for key in sorted(exc.extra_fields)]
    if isinstance(exc, FieldError):
        return [f"{path + '.' if path else ''}{exc.field}: {exc.message}"]
    if isinstance(exc, KeyError):
        return [f"{path}: required, but missing"]
    return [f"{path or '$'}: {exc}"]


def structure(data: Any, cls: type[T], path: str = "") -> T:
    """Structure ``data`` into ``cls``; raise `ConfigError` whose lines name each bad field's path."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path or '$'}: expected a mapping, got {type(data).__name__}")
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, FieldError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError("\n".join(_messages(exc, path))) from None


def structure_plugin_options(options_class: type | None, data: Mapping[str, Any], path: str) -> Any:
    """Validate a plugin's option mapping against its attrs class (errors name ``path.field``).

    Without an options class only an empty mapping is accepted, and ``{}`` is returned.
    """
    if options_class is None:
        if data:
            raise ConfigError(f"{path}: this plugin takes no options, got {', '.join(sorted(data))}")
        return {}
    return structure(dict(data), options_class, path)


structure_options = structure_plugin_options


# ---- environment ----------------------------------------------------------------------------------
ENV_PREFIX = "SAGELLM_"
ENV_SEPARATOR = "__"


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The nested config mapping set by ``SAGELLM_<SECTION>__<FIELD>[__<KEY>...]`` variables.

    ``SAGELLM_SCHEDULER__MAX_NUM_SEQS=256`` -> ``{"scheduler": {"max_num_seqs": 256}}``. Values are
    YAML (``8``, ``true``, ``[latency, kv]``, ``{mode: strict}``), except that a field declared as a
    string keeps the text as written. Variables without ``__`` (``SAGELLM_BACKEND``, ...) are not
    config fields and are left alone.
    """
    data: dict[str, Any] = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or ENV_SEPARATOR not in variable:
            continue
        keys = [k.lower() for k in variable[len(ENV_PREFIX):].split(ENV_SEPARATOR)]
        if not all(keys):
            raise ConfigError(f"{variable}: empty name part (use SAGELLM_<SECTION>__<FIELD>)")
        target = data
        for key in keys[:-1]:
            node = target.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{variable}: {'.'.join(keys)} conflicts with another variable")
            target = node
        target[keys[-1]] = _env_value(keys, environ[variable], variable)
    return data


def _env_value(keys: list[str], text: str, variable: str) -> Any:
    if len(keys) == 2 and _is_str_field(keys[0], keys[1]):
        return text
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{'.'.join(keys)}: {variable} is not a valid YAML value: {exc}") from None


def _is_str_field(section: str, field: str) -> bool:
    section_field = attrs.fields_dict(attrs.resolve_types(EngineConfig)).get(section)
    if section_field is None or not isinstance(section_field.type, type) or not attrs.has(section_field.type):
        return False
    target = attrs.fields_dict(attrs.resolve_types(section_field.type)).get(field)
    return target is not None and target.type in (str, str | None)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | None = None, environ: Mapping[str, str] | None = None) -> EngineConfig:
    """The config a command starts from: defaults, then the YAML file at ``path`` (if any), then the
    ``SAGELLM_<SECTION>__<FIELD>`` environment variables. Errors name the field path (and the
    variables, when they were set from the environment)."""
    import os

    base = EngineConfig.from_yaml(path) if path else EngineConfig()
    overrides = env_overrides(os.environ if environ is None else environ)
    if not overrides:
        return base
    try:
        return EngineConfig.from_dict(_merge(base.to_dict(), overrides))
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n(from the environment: "
                          f"{', '.join(sorted(v for v in (environ or os.environ) if _is_config_var(v)))})") from None


def _is_config_var(variable: str) -> bool:
    return variable.startswith(ENV_PREFIX) and ENV_SEPARATOR in variable
