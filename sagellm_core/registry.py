"""What the plugins registered: backends, KV policies, schedulers, metric sinks and CLI commands, by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import attrs

from sagellm_core.errors import PluginError

if TYPE_CHECKING:
    from sagellm_core.backend import BackendSpec
    from sagellm_core.commands import CommandSpec

FAMILIES = ("backend", "kv_policy", "kv_tier", "scheduler", "metric", "command")


@attrs.frozen
class Registration:
    """One named thing a plugin provides."""

    family: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    options: type | None = None
    spec: BackendSpec | None = None  # backends only
    command: CommandSpec | None = None  # commands only


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

    def add_all(self, registrations: Iterable[Registration]) -> None:
        """Add one plugin's registrations: all of them, or (on a clash) none."""
        registrations = list(registrations)
        seen: set[tuple[str, str]] = set()
        for registration in registrations:
            key = (registration.family, registration.name)
            existing = self.entries[registration.family].get(registration.name)
            if existing is not None and existing.plugin != registration.plugin:
                raise PluginError(
                    f"{registration.family} {registration.name!r} from plugin {registration.plugin!r} "
                    f"clashes with the one from plugin {existing.plugin!r}"
                )
            if key in seen:
                raise PluginError(f"plugin {registration.plugin!r} registered {registration.family} "
                                  f"{registration.name!r} twice")
            seen.add(key)
        for registration in registrations:
            self.entries[registration.family][registration.name] = registration

    def get(self, family: str, name: str) -> Registration:
        try:
            return self.entries[family][name]
        except KeyError:
            known = ", ".join(sorted(self.entries[family])) or "none"
            raise PluginError(f"unknown {family} {name!r}; registered: {known}") from None

    def names(self, family: str) -> list[str]:
        """Registered names of a family, sorted."""
        return sorted(self.entries[family])

    def all(self, family: str) -> list[Registration]:
        """Registrations of a family, in registration order."""
        return list(self.entries[family].values())
