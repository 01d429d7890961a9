"""Engine configuration: frozen attrs classes per section, (de)serialised through one strict cattrs converter.

Every error names its field path, e.g. ``scheduler.max_num_seqs: must be >= 1, got 0``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from sagellm_core.errors import ConfigError

T = TypeVar("T")


class FieldError(ValueError):
    """Raised by validators so the error path can name the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def at_least(minimum: float) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and value < minimum:
            raise FieldError(attribute.name, f"must be >= {minimum}, got {value}")
    return check


def in_range(low: float, high: float, *, low_open: bool = False) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        bad_low = value <= low if low_open else value < low
        if value is not None and (bad_low or value > high):
            bracket = "(" if low_open else "["
            raise FieldError(attribute.name, f"must be in {bracket}{low}, {high}], got {value}")
    return check


def one_of(*choices: str) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise FieldError(attribute.name, f"must be one of {', '.join(choices)}; got {value!r}")
    return check


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


@attrs.frozen
class SchedulerConfig:
    """Scheduler plugin and budgets per step.

    ``async_scheduling``: queue step N+1 on the device before reading step N's sampled tokens, so
    the host's scheduling and input preparation hide behind device work (vLLM's async scheduling).
    ``auto``: on where the backend copies asynchronously (CUDA), off on the CPU. Steps with
    repetition/presence/frequency penalties or logprobs need the tokens on the host and run
    synchronously. A request that ends (EOS, stop) has one extra token computed and dropped.

    ``overlap_output``: without async scheduling, for batches of 8+ sequences, detokenize and emit
    a step's outputs while the device runs the next step (outputs arrive one step later).
    """

    name: str = "fcfs"
    max_num_seqs: int = attrs.field(default=128, validator=at_least(1))
    max_num_batched_tokens: int = attrs.field(default=2048, validator=at_least(1))
    max_waiting: int = attrs.field(default=4096, validator=at_least(1))
    chunked_prefill: bool = True
    async_scheduling: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))
    overlap_output: bool = True
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class BackendConfig:
    """Device backend: ``auto`` picks by priority; ``SAGELLM_BACKEND`` overrides ``auto``."""

    name: str = "auto"
    device_index: int = attrs.field(default=0, validator=at_least(0))
    cuda_graphs: bool = True
    max_graph_batch_size: int = attrs.field(default=256, validator=at_least(1))


@attrs.frozen
class MetricsConfig:
    """Metric sinks to enable and latency percentiles to report."""

    enabled: list[str] = attrs.field(factory=lambda: ["latency", "throughput", "kv"])
    percentiles: list[float] = attrs.field(factory=lambda: [50.0, 90.0, 99.0])


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
class EngineConfig:
    """Top-level configuration. Build with keyword sections, `from_dict`, or `from_yaml`."""

    model: ModelConfig = attrs.field(factory=ModelConfig)
    kv_cache: KVCacheConfig = attrs.field(factory=KVCacheConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    backend: BackendConfig = attrs.field(factory=BackendConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    benchmark: BenchmarkConfig = attrs.field(factory=BenchmarkConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)

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
        with_notes, without = exc.group_exceptions()
        out = []
        for sub, note in with_notes:
            out += _messages(sub, f"{path}.{note.name}" if path else note.name)
        for sub in without:
            out += _messages(sub, path)
        return out
    if isinstance(exc, IterableValidationError):
        with_notes, without = exc.group_exceptions()
        out = []
        for sub, note in with_notes:
            out += _messages(sub, f"{path}[{note.index}]")
        for sub in without:
            out += _messages(sub, path)
        return out
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"{path + '.' if path else ''}{key}: unknown key" for key in sorted(exc.extra_fields)]
    if isinstance(exc, FieldError):
        return [f"{path + '.' if path else ''}{exc.field}: {exc.message}"]
    if isinstance(exc, KeyError):
        return [f"{path}: missing required key {exc}"]
    return [f"{path or '$'}: {exc}"]


def structure(data: Any, cls: type[T], path: str = "") -> T:
    """Structure ``data`` into ``cls``; raise `ConfigError` whose lines name each bad field's path."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path or '$'}: expected a mapping, got {type(data).__name__}")
    try:
        return converter.structure(data, cls)
    except (ClassValidationError, FieldError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError("\n".join(_messages(exc, path))) from None


def structure_options(options_class: type[T] | None, data: dict[str, Any], path: str) -> T | dict[str, Any]:
    """Validate a plugin's option mapping against its attrs class (errors name ``path.field``)."""
    if options_class is None:
        if data:
            raise ConfigError(f"{path}: this plugin takes no options, got {', '.join(sorted(data))}")
        return {}
    return structure(data, options_class, path)
