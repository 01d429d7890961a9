"""What the plugins registered: backends, KV policies, schedulers, metric sinks and CLI commands, by name."""

from __future__ import annotations

from typing import Any, Callable

import attrs

from sagellm_core.errors import PluginError

FAMILIES = ("backend", "kv_policy", "scheduler", "metric", "command")


@attrs.frozen
class Registration:
    """One named thing a plugin provides."""

    family: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    options: type | None = None
    spec: Any = None  # the BackendSpec for backends, the CommandSpec for commands


@attrs.define
class Registry:
    """Registrations by family and name. Built once by the plugin manager; read by the engine."""

    entries: dict[str, dict[str, Registration]] = attrs.field(
        factory=lambda: {family: {} for family in FAMILIES}
    )

    def add(self, registration: Registration) -> None:
        family = self.entries[registration.family]
        existing = family.get(registration.name)
        if existing is not None and existing.plugin != registration.plugin:
            raise PluginError(
                f"{registration.family} {registration.name!r} from plugin {registration.plugin!r} "
                f"clashes with the one from plugin {existing.plugin!r}"
            )
        family[registration.name] = registration

    def get(self, family: str, name: str) -> Registration:
        try:
            return self.entries[family][name]
        except KeyError:
            known = ", ".join(sorted(self.entries[family])) or "none"
            raise PluginError(f"unknown {family} {name!r}; registered: {known}") from None

    def names(self, family: str) -> list[str]:
        return sorted(self.entries[family])

    def all(self, family: str) -> list[Registration]:
        return list(self.entries[family].values())
