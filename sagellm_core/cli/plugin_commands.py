"""Sub-commands that plugins add through the ``sagellm_register_commands`` hook.

First-party commands that live in their own distribution (``sagellm bench``) keep a placeholder when
their plugin is not installed, so the CLI says how to install it instead of "invalid choice".
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable

from sagellm_core.commands import CommandSpec
from sagellm_core.errors import PluginError

INSTALL_HINTS = {
    "bench": ("sagellm-bench", "pip install -e plugins/sagellm-bench   # from the sageLLM repository root "
                               "(scripts/setup.sh installs it)"),
}


def registered_commands() -> list[CommandSpec]:
    """The commands of every loaded plugin (``SAGELLM_PLUGINS`` / ``SAGELLM_BLOCK_PLUGINS`` apply)."""
    from sagellm_core.plugin_manager import create_plugin_manager

    registry = create_plugin_manager().registry
    return [registration.command for registration in registry.all("command") if registration.command is not None]


def add_plugin_commands(subparsers: argparse._SubParsersAction, taken: Iterable[str],
                        commands: list[CommandSpec] | None = None) -> None:
    """One sub-parser per plugin command, then a placeholder for each first-party one that is missing."""
    taken = set(taken)
    for spec in registered_commands() if commands is None else commands:
        if spec.name in taken:
            print(f"warning: a plugin's command {spec.name!r} clashes with a built-in command; ignored",
                  file=sys.stderr)
            continue
        if not _declares_cleanly(spec):
            continue
        parser = subparsers.add_parser(spec.name, help=spec.help)
        parser.set_defaults(func=spec.run)
        spec.add_arguments(parser)
        taken.add(spec.name)
    for name, (distribution, install) in INSTALL_HINTS.items():
        if name not in taken:
            _add_placeholder(subparsers, name, distribution, install)


def _declares_cleanly(spec: CommandSpec) -> bool:
    """Try ``add_arguments`` on a scratch parser first: a broken plugin must not break the other commands."""
    try:
        spec.add_arguments(argparse.ArgumentParser(prog=f"sagellm {spec.name}"))
    except Exception as exc:
        print(f"warning: the plugin command {spec.name!r} could not declare its options "
              f"({type(exc).__name__}: {exc}); ignored", file=sys.stderr)
        return False
    return True


def _add_placeholder(subparsers: argparse._SubParsersAction, name: str, distribution: str, install: str) -> None:
    message = (f"`sagellm {name}` comes from the plugin distribution {distribution}, which is not installed "
               f"(or not loaded: see `sagellm plugins`). Install it with:\n  {install}")
    parser = subparsers.add_parser(name, help=f"(needs the plugin {distribution})", add_help=False,
                                   description=message)
    parser.add_argument("args", nargs=argparse.REMAINDER)

    def missing(_: argparse.Namespace) -> int:
        raise PluginError(message)

    parser.set_defaults(func=missing)
