"""The plugins a config selects, checked before anything expensive happens.

`validate_plugin_selection(config, manager)` resolves the scheduler, KV policy, metric sinks and
(if named) backend of an `EngineConfig` against the registry and structures each one's options
against its plugin's options class. Every problem is reported at once, each line naming its config
path and, for an unknown name, the registered names. Call it before loading a model; the returned
`PluginSelection` builds the plugin objects with the validated options.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import attrs

from sagellm_core.config import EngineConfig, MetricsConfig, SchedulerConfig, structure_plugin_options
from sagellm_core.errors import ConfigError, PluginError
from sagellm_core.registry import Registration, Registry

if TYPE_CHECKING:
    from sagellm_core.kv.policy import KVPolicy
    from sagellm_core.kv.tiers.base import KVTier, TierContext
    from sagellm_core.metrics.base import MetricSink
    from sagellm_core.plugin_manager import SageLLMPluginManager
    from sagellm_core.schedulers.base import Scheduler


class PluginSelectionError(ConfigError, PluginError):
    """A config names a plugin that is not registered, or gives a plugin options it refuses."""


@attrs.frozen
class Selected:
    """One selected plugin object: its registration and its validated options."""

    registration: Registration
    options: Any


@attrs.frozen
class PluginSelection:
    """What a config selects, validated. ``backend`` is None when the backend is chosen by probing."""

    scheduler: Selected
    kv_policy: Selected
    metrics: dict[str, Selected]
    backend: Selected | None
    kv_tiers: dict[str, Selected] = attrs.field(factory=dict)

    def create_scheduler(self, config: SchedulerConfig) -> Scheduler:
        """``factory(scheduler_config, options)``."""
        scheduler: Scheduler = self.scheduler.registration.factory(config, self.scheduler.options)
        return scheduler

    def create_kv_policy(self) -> KVPolicy:
        """``factory(options)``: call once per KV pool (a policy holds one pool's free blocks)."""
        policy: KVPolicy = self.kv_policy.registration.factory(self.kv_policy.options)
        return policy

    def create_kv_tiers(self, context: TierContext) -> list[KVTier]:
        """``factory(context)`` or ``factory(context, options)`` per selected tier, top first."""
        tiers: list[KVTier] = []
        for selected in self.kv_tiers.values():
            factory = selected.registration.factory
            if selected.registration.options is None:
                tiers.append(factory(context))
            else:
                tiers.append(factory(attrs.evolve(context, options=selected.options), selected.options))
        return tiers

    def create_metric_sinks(self, config: MetricsConfig) -> dict[str, MetricSink]:
        """``factory(metrics_config)``, or ``factory(metrics_config, options)`` for a sink that
        registered an options class; keyed by sink name, in ``metrics.sinks()`` order."""
        sinks: dict[str, MetricSink] = {}
        for name, selected in self.metrics.items():
            factory = selected.registration.factory
            if selected.registration.options is None:
                sinks[name] = factory(config)
            else:
                sinks[name] = factory(config, selected.options)
        return sinks


def requested_backend(config: EngineConfig) -> str | None:
    """The backend named by ``backend.name`` or, for ``auto``, by ``SAGELLM_BACKEND``; None = probe."""
    name = config.backend.name if config.backend.name != "auto" else os.environ.get("SAGELLM_BACKEND") or None
    return None if name == "auto" else name


def selection_errors(config: EngineConfig, registry: Registry) -> tuple[PluginSelection | None, list[str]]:
    """(the selection, []) when valid, else (None, error lines naming config paths)."""
    errors: list[str] = []
    scheduler = _select(registry, "scheduler", config.scheduler.name, "scheduler.name",
                        config.scheduler.options, "scheduler.options", errors)
    kv_policy = _select(registry, "kv_policy", config.kv_cache.policy, "kv_cache.policy",
                        config.kv_cache.policy_options, "kv_cache.policy_options", errors)
    backend = None
    backend_name = requested_backend(config)
    if backend_name is not None:
        path = "backend.name" if config.backend.name != "auto" else "SAGELLM_BACKEND"
        backend = _select(registry, "backend", backend_name, path, config.backend.options, "backend.options", errors)
    metrics: dict[str, Selected] = {}
    sinks = config.metrics.sinks()
    for name in sinks:
        path = (f"metrics.enabled[{config.metrics.enabled.index(name)}]" if name in config.metrics.enabled
                else f"metrics.extra[{config.metrics.extra.index(name)}]")
        selected = _select(registry, "metric", name, path, config.metrics.options.get(name, {}),
                           f"metrics.options.{name}", errors)
        if selected is not None:
            metrics[name] = selected
    for name in sorted(set(config.metrics.options) - set(sinks)):
        errors.append(f"metrics.options.{name}: sink {name!r} is not in metrics.enabled or metrics.extra")
    kv_tiers = _select_tiers(config, registry, errors)
    if errors or scheduler is None or kv_policy is None:
        return None, errors
    return PluginSelection(scheduler, kv_policy, metrics, backend, kv_tiers), []


def _select_tiers(config: EngineConfig, registry: Registry, errors: list[str]) -> dict[str, Selected]:
    tiers_config = config.kv_tiers
    names = tiers_config.names()
    selected: dict[str, Selected] = {}
    for name in names:
        path = f"kv_tiers.extra[{tiers_config.extra.index(name)}]" if name in tiers_config.extra else "kv_tiers"
        tier = _select(registry, "kv_tier", name, path, tiers_config.options.get(name, {}),
                       f"kv_tiers.options.{name}", errors)
        if tier is not None:
            selected[name] = tier
    for name in sorted(set(tiers_config.options) - set(names)):
        errors.append(f"kv_tiers.options.{name}: tier {name!r} is not in use (kv_tiers.extra)")
    if names and (config.parallel.tensor_parallel_size > 1 or config.parallel.pd_split):
        errors.append("kv_tiers: tiers run in one process only (not with tensor parallelism or parallel.pd_split)")
    return selected


def validate_plugin_selection(config: EngineConfig, manager: SageLLMPluginManager) -> PluginSelection:
    """Check every plugin name and option mapping of ``config``; raise `PluginSelectionError` (a
    `ConfigError` and a `PluginError`) listing all problems: unknown names come with the registered
    names, plugins that failed to load are named."""
    selection, errors = selection_errors(config, manager.registry)
    if selection is not None:
        return selection
    failed = [record.name for record in manager.failed()]
    if failed:
        errors.append(f"note: plugins that failed to load: {', '.join(failed)} (see `sagellm plugins`)")
    raise PluginSelectionError("\n".join(errors))


def _select(registry: Registry, family: str, name: str, name_path: str, options: dict[str, Any],
            options_path: str, errors: list[str]) -> Selected | None:
    if name not in registry.names(family):
        known = ", ".join(registry.names(family)) or "none"
        errors.append(f"{name_path}: unknown {family} {name!r}; registered: {known}")
        return None
    registration = registry.get(family, name)
    try:
        return Selected(registration, structure_plugin_options(registration.options, options, options_path))
    except ConfigError as exc:
        errors.extend(str(exc).splitlines())
        return None
