"""Server-only settings (not engine config): API keys, request size limit, generation-config defaults,
drain timeout. Built from `sagellm serve`'s options and the environment (``SAGELLM_API_KEY``)."""

from __future__ import annotations

import os
from typing import Any

import attrs

from sagellm_core.errors import ConfigError

API_KEY_ENV = "SAGELLM_API_KEY"
DEFAULT_MAX_REQUEST_BYTES = 8 << 20


def _keys(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    keys = tuple(str(key).strip() for key in value)
    return tuple(key for key in keys if key)


def _positive(_: object, attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"server.{attribute.name}: must be > 0, got {value!r}")


def _generation_config(_: object, attribute: attrs.Attribute, value: str) -> None:
    if value not in ("auto", "vllm"):
        raise ConfigError(f"server.generation_config: must be 'auto' or 'vllm', got {value!r}")


@attrs.frozen
class ServerSettings:
    """``api_keys``: bearer tokens accepted (none: no authentication). ``auth_health_metrics``:
    ``/health`` and ``/metrics`` need a key too (open by default, for probes and scrapers).
    ``max_request_bytes``: larger bodies get 413 before they are read. ``generation_config``:
    ``auto`` applies the model's generation_config.json sampling defaults to requests that do not
    set them (as vLLM does); ``vllm`` ignores them. ``drain_timeout_s``: on SIGTERM, requests in
    flight get this long to finish; a second SIGTERM or SIGINT exits at once. ``tool_call_parser``:
    the model's tool-call format (``auto``: detected from the chat template)."""

    api_keys: tuple[str, ...] = attrs.field(default=(), converter=_keys)
    auth_health_metrics: bool = False
    max_request_bytes: int = attrs.field(default=DEFAULT_MAX_REQUEST_BYTES, validator=_positive)
    generation_config: str = attrs.field(default="auto", validator=_generation_config)
    drain_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    tool_call_parser: str = "auto"

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServerSettings":
        """Settings whose API keys come from ``SAGELLM_API_KEY`` (comma-separated) unless given."""
        if not overrides.get("api_keys"):
            overrides["api_keys"] = os.environ.get(API_KEY_ENV)
        return cls(**{key: value for key, value in overrides.items() if value is not None})
