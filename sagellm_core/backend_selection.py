"""Choose the backend: an explicit name (config or ``SAGELLM_BACKEND``) wins, else the highest-priority
backend whose probe finds its device."""

from __future__ import annotations

import os

import attrs

from sagellm_core.backend import Backend, BackendSpec, ProbeResult
from sagellm_core.config import BackendConfig, structure_plugin_options
from sagellm_core.errors import BackendUnavailableError
from sagellm_core.plugin_manager import SageLLMPluginManager


@attrs.frozen
class BackendProbe:
    name: str
    priority: int
    plugin: str
    result: ProbeResult


@attrs.frozen
class BackendChoice:
    spec: BackendSpec
    reason: str
    probes: tuple[BackendProbe, ...]


def probe_all(manager: SageLLMPluginManager) -> list[BackendProbe]:
    """Probe every registered backend (side-effect free), highest priority first."""
    probes = []
    for registration in manager.registry.all("backend"):
        spec = registration.spec
        assert spec is not None  # backend registrations always carry their spec
        try:
            result = spec.probe()
        except Exception as exc:  # a probe must never take the engine down
            result = ProbeResult(False, f"probe raised {type(exc).__name__}: {exc}")
        probes.append(BackendProbe(spec.name, spec.priority, registration.plugin, result))
    return sorted(probes, key=lambda p: -p.priority)


def _summary(probes: list[BackendProbe], manager: SageLLMPluginManager) -> str:
    lines = [f"  {p.name}: {'found' if p.result.available else 'not found'} ({p.result.detail})" for p in probes]
    lines = lines or ["  (no backends registered)"]
    lines += [f"  plugin {r.name}: {'failed to load' if r.status == 'failed' else r.status} ({r.error})"
              for r in manager.records.values() if r.status != "loaded"]
    return "\n".join(lines)


def select_backend(manager: SageLLMPluginManager, requested: str | None = None) -> BackendChoice:
    """Return the backend to use, or raise `BackendUnavailableError` saying what was probed and found."""
    if requested in (None, "auto"):
        requested = os.environ.get("SAGELLM_BACKEND") or None
    if requested == "auto":
        requested = None
    probes = probe_all(manager)
    if requested is not None:
        match = [p for p in probes if p.name == requested]
        if not match:
            raise BackendUnavailableError(
                f"backend {requested!r} is not installed or failed to load. Probed:\n{_summary(probes, manager)}"
            )
        if not match[0].result.available:
            raise BackendUnavailableError(
                f"backend {requested!r} found no device ({match[0].result.detail}). Probed:\n"
                f"{_summary(probes, manager)}"
            )
        return BackendChoice(_spec(manager, requested), "chosen explicitly", tuple(probes))
    for probe in probes:
        if probe.result.available:
            return BackendChoice(_spec(manager, probe.name), f"highest priority available (priority {probe.priority})",
                                 tuple(probes))
    raise BackendUnavailableError(f"no backend found a device. Probed:\n{_summary(probes, manager)}")


def _spec(manager: SageLLMPluginManager, name: str) -> BackendSpec:
    spec = manager.registry.get("backend", name).spec
    assert spec is not None  # backend registrations always carry their spec
    return spec


def create_backend(spec: BackendSpec, config: BackendConfig) -> Backend:
    """Build the selected backend: ``backend.options`` is validated against the spec's options class
    (errors name ``backend.options.<field>``) and passed as ``create(config, options)``; a backend
    without an options class gets ``create(config)`` and must be given no options."""
    options = structure_plugin_options(spec.options, config.options, "backend.options")
    backend = spec.create(config, options) if spec.options is not None else spec.create(config)
    if not isinstance(backend, Backend):
        raise BackendUnavailableError(f"backend {spec.name!r}: create() returned {type(backend).__name__}, "
                                      "not a sagellm_core.backend.Backend")
    return backend
