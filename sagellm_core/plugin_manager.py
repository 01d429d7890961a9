"""Plugin manager factory: built-in plugins plus entry-point plugins, each loaded in isolation.

Environment:
- ``SAGELLM_PLUGINS``: comma-separated allow-list of external plugin names; unset = all installed,
  empty string = none.
- ``SAGELLM_BLOCK_PLUGINS``: comma-separated names never loaded (built-ins included).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from importlib import metadata
from typing import Any, Callable, Iterable

import attrs
import pluggy
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from sagellm_core import PLUGIN_API_VERSION, hookspecs
from sagellm_core.backend import BackendSpec
from sagellm_core.commands import CommandSpec
from sagellm_core.errors import PluginError
from sagellm_core.registry import Registration, Registry

BUILTIN_PLUGINS: dict[str, str] = {
    "cpu": "sagellm_core.builtin.cpu_backend",
    "builtin_kv_policies": "sagellm_core.builtin.kv_policies",
    "builtin_kv_tiers": "sagellm_core.builtin.kv_tiers",
    "builtin_schedulers": "sagellm_core.builtin.schedulers",
    "builtin_metrics": "sagellm_core.builtin.metrics",
}

HOOK_FAMILY = {
    "sagellm_register_backends": "backend",
    "sagellm_register_kv_policies": "kv_policy",
    "sagellm_register_kv_tiers": "kv_tier",
    "sagellm_register_schedulers": "scheduler",
    "sagellm_register_metrics": "metric",
    "sagellm_register_commands": "command",
}


@attrs.define
class PluginRecord:
    """What `sagellm plugins` shows about one plugin."""

    name: str
    distribution: str
    version: str
    status: str  # "loaded" | "failed" | "blocked" | "not allowed"
    error: str = ""
    hooks: list[str] = attrs.field(factory=list)
    builtin: bool = False


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [item.strip() for item in raw.split(",") if item.strip()]


def _check_api_range(plugin_name: str, module: Any) -> None:
    declared = getattr(module, "SAGELLM_PLUGIN_API", None)
    if declared is None:
        return
    try:
        accepted = SpecifierSet(str(declared))
    except InvalidSpecifier as exc:
        raise PluginError(f"plugin {plugin_name!r}: invalid SAGELLM_PLUGIN_API {declared!r}: {exc}") from None
    if Version(PLUGIN_API_VERSION) not in accepted:
        raise PluginError(
            f"plugin {plugin_name!r} supports sageLLM plugin API {declared}, "
            f"but this core provides {PLUGIN_API_VERSION}"
        )


def _unknown_hooks(module: Any, known: set[str]) -> list[str]:
    prefix = "sagellm_"
    names = [n for n in dir(module) if n.startswith(prefix) and callable(getattr(module, n))]
    return [n for n in names if n not in known]


class SageLLMPluginManager:
    """pluggy's manager plus per-plugin load records and the registry of what plugins provide."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._registry: Registry | None = None
        self._known_hooks = {n for n in dir(hookspecs) if n.startswith("sagellm_")}

    # ---- loading -------------------------------------------------------------------------------
    def load_builtins(self, blocked: Iterable[str] = ()) -> None:
        for name, module_path in BUILTIN_PLUGINS.items():
            self._load(name, functools.partial(importlib.import_module, module_path), "sagellm", builtin=True,
                       blocked=name in blocked)

    def load_entry_points(self, allow: list[str] | None, blocked: Iterable[str] = ()) -> None:
        blocked = set(blocked)
        for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            if allow is not None and ep.name not in allow:
                self._record(ep.name, dist, "not allowed", error="not in SAGELLM_PLUGINS")
                continue
            self._load(ep.name, ep.load, dist, blocked=ep.name in blocked)

    def register_object(self, name: str, plugin: Any) -> None:
        """Register an in-process plugin object or module (tests, notebooks)."""
        self._load(name, lambda: plugin, "(in-process)")

    def _load(self, name: str, loader: Callable[[], Any], dist: str, *, builtin: bool = False,
              blocked: bool = False) -> None:
        if name in self.records and self.records[name].status == "loaded":
            return  # idempotent: worker processes may load twice
        if blocked:
            self._record(name, dist, "blocked", error="blocked by SAGELLM_BLOCK_PLUGINS", builtin=builtin)
            return
        try:
            plugin = loader()
            _check_api_range(name, plugin)
            unknown = _unknown_hooks(plugin, self._known_hooks)
            if unknown:
                raise PluginError(
                    f"plugin {name!r} implements unknown hook(s) {', '.join(unknown)}; "
                    f"known hooks: {', '.join(sorted(self._known_hooks))}"
                )
            self.pm.register(plugin, name=name)
            unspecified = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [] if not c.has_spec())
            if unspecified:
                self.pm.unregister(plugin)
                raise PluginError(
                    f"plugin {name!r} implements unknown hook(s) {', '.join(unspecified)}; "
                    f"known hooks: {', '.join(sorted(self._known_hooks))}"
                )
        except Exception as exc:  # isolation: one broken plugin must not break the others
            self._record(name, dist, "failed", error=f"{type(exc).__name__}: {exc}", builtin=builtin)
            return
        hooks = [h.name for h in self.pm.get_hookcallers(plugin) or []]
        self._record(name, dist, "loaded", hooks=sorted(hooks), builtin=builtin)
        self._registry = None

    def _record(self, name: str, dist: str, status: str, **fields: Any) -> None:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = ""
        self.records[name] = PluginRecord(name=name, distribution=dist, version=version, status=status, **fields)

    # ---- registry ------------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """Everything the loaded plugins registered; a plugin whose hook raises is marked failed."""
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> Registry:
        """Run every registration hook; a plugin whose hook raises, or whose names clash with another
        plugin's, contributes nothing (all its registrations are dropped) and is unregistered."""
        staged: dict[str, list[Registration]] = {}
        failures: dict[str, str] = {}
        for hook_name, family in HOOK_FAMILY.items():
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():  # registration order: the first to register a name keeps it
                plugin_name = self.pm.get_name(impl.plugin) or "?"
                if plugin_name in failures:
                    continue
                plugin_staged = staged.setdefault(plugin_name, [])
                register = _make_register(family, plugin_name, plugin_staged)
                try:
                    impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
                except Exception as exc:
                    failures[plugin_name] = f"{hook_name} raised {type(exc).__name__}: {exc}"
        registry = Registry()
        for plugin_name, registrations in staged.items():
            if plugin_name in failures:
                continue
            try:
                registry.add_all(registrations)
            except PluginError as exc:
                failures[plugin_name] = str(exc)
        for plugin_name, error in failures.items():
            self._fail(plugin_name, error)
        return registry

    def _fail(self, plugin_name: str, error: str) -> None:
        """Mark a loaded plugin failed and unregister it, so none of its hooks is called again."""
        record = self.records.get(plugin_name)
        if record is not None:
            record.status = "failed"
            record.error = error
        if self.pm.get_plugin(plugin_name) is not None:
            self.pm.unregister(name=plugin_name)

    def configure(self, config: Any) -> None:
        """Announce the final engine config to plugins (historic hook)."""
        self.pm.hook.sagellm_configure.call_historic(kwargs={"config": config})

    def failed(self) -> list[PluginRecord]:
        """Plugins that failed to load or whose registration hook raised."""
        return [r for r in self.records.values() if r.status == "failed"]


def _make_register(family: str, plugin_name: str, staged: list[Registration]) -> Callable[..., None]:
    if family == "backend":
        def register_backend(spec: BackendSpec) -> None:
            if not isinstance(spec, BackendSpec):
                raise PluginError(f"plugin {plugin_name!r} registered a backend that is not a BackendSpec: {spec!r}")
            staged.append(Registration(family, spec.name, spec.create, plugin_name, options=spec.options, spec=spec))
        return register_backend
    if family == "command":
        def register_command(name: str, add_arguments: Callable[..., Any], run: Callable[..., Any],
                             help: str = "") -> None:
            try:
                spec = CommandSpec(name, add_arguments, run, help)
            except ValueError as exc:
                raise PluginError(f"plugin {plugin_name!r}: {exc}") from None
            staged.append(Registration(family, name, run, plugin_name, command=spec))
        return register_command

    def register(name: str, factory: Callable[..., Any], options: type | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin_name!r} registered a {family} without a name")
        if not callable(factory):
            raise PluginError(f"plugin {plugin_name!r}: {family} {name!r} factory is not callable")
        if options is not None and not attrs.has(options):
            raise PluginError(f"plugin {plugin_name!r}: {family} {name!r} options must be an attrs class, "
                              f"got {options!r}")
        staged.append(Registration(family, name, factory, plugin_name, options=options))
    return register


def create_plugin_manager(*, entry_points: bool = True, extra: dict[str, Any] | None = None) -> SageLLMPluginManager:
    """Build a plugin manager: built-ins, then installed entry points filtered by the env allow/block lists.

    ``extra`` registers in-process plugin objects by name (handy in tests and notebooks).
    """
    manager = SageLLMPluginManager()
    blocked = _env_list("SAGELLM_BLOCK_PLUGINS") or []
    manager.load_builtins(blocked)
    if entry_points:
        manager.load_entry_points(_env_list("SAGELLM_PLUGINS"), blocked)
    for name, plugin in (extra or {}).items():
        manager.register_object(name, plugin)
    return manager


def hook_signature(hook_name: str) -> str:
    """The argument list of a hook spec, for documentation output."""
    return str(inspect.signature(getattr(hookspecs, hook_name)))
