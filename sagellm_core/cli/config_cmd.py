"""``sagellm config``: print the default configuration as YAML (with any ``SAGELLM_<SECTION>__<FIELD>``
environment overrides applied); ``sagellm config --validate FILE``: check
a YAML file (structure, values, and the named plugins and their options) and print OK or the errors,
each naming its field path. Exit code 2 on an invalid file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sagellm_core.config import EngineConfig, load_config
from sagellm_core.errors import ConfigError
from sagellm_core.plugin_manager import SageLLMPluginManager, create_plugin_manager
from sagellm_core.plugin_selection import validate_plugin_selection


def add_parser(subparsers: Any) -> None:
    """Register the ``config`` sub-command."""
    parser = subparsers.add_parser("config", help="print the default configuration, or validate a YAML file")
    parser.add_argument("--validate", metavar="FILE", help="validate FILE instead of printing the defaults")
    parser.add_argument("--no-plugins", action="store_true",
                        help="with --validate: skip checking plugin names and plugin options")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.validate is None:
        sys.stdout.write(load_config().to_yaml())
        return 0
    errors = validate_file(args.validate, check_plugins=not args.no_plugins)
    if errors:
        print(f"{args.validate}: invalid configuration", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return 2
    print(f"{args.validate}: OK")
    return 0


def validate_file(path: str, *, check_plugins: bool = True) -> list[str]:
    """Error lines for the YAML config at ``path`` (empty when valid)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return [f"$: cannot read {path}: {exc.strerror or exc}"]
    try:
        config = EngineConfig.from_yaml(text)
    except ConfigError as exc:
        return str(exc).splitlines()
    return plugin_errors(config, create_plugin_manager()) if check_plugins else []


def plugin_errors(config: EngineConfig, manager: SageLLMPluginManager) -> list[str]:
    """Check that the named scheduler, KV policy, metric sinks and backend are registered, and that
    each one's options match its plugin's options class (`validate_plugin_selection`'s checks)."""
    try:
        validate_plugin_selection(config, manager)
    except ConfigError as exc:
        return str(exc).splitlines()
    return []
