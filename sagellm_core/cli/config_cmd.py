"""``sagellm config``: print the default configuration as YAML; ``sagellm config --validate FILE``: check
a YAML file (structure, values, and the named plugins and their options) and print OK or the errors,
each naming its field path. Exit code 2 on an invalid file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sagellm_core.config import EngineConfig, structure_options
from sagellm_core.errors import ConfigError
from sagellm_core.plugin_manager import SageLLMPluginManager, create_plugin_manager
from sagellm_core.registry import Registry


def add_parser(subparsers: Any) -> None:
    """Register the ``config`` sub-command."""
    parser = subparsers.add_parser("config", help="print the default configuration, or validate a YAML file")
    parser.add_argument("--validate", metavar="FILE", help="validate FILE instead of printing the defaults")
    parser.add_argument("--no-plugins", action="store_true",
                        help="with --validate: skip checking plugin names and plugin options")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.validate is None:
        sys.stdout.write(EngineConfig().to_yaml())
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
    """Check that the named scheduler, KV policy, backend and metrics are registered, and that the
    scheduler's and KV policy's options match their plugin's options class."""
    registry = manager.registry
    errors = _named(registry, "scheduler", config.scheduler.name, "scheduler.name")
    if not errors:
        errors += _options(registry, "scheduler", config.scheduler.name, config.scheduler.options, "scheduler.options")
    policy_errors = _named(registry, "kv_policy", config.kv_cache.policy, "kv_cache.policy")
    errors += policy_errors or _options(registry, "kv_policy", config.kv_cache.policy,
                                        config.kv_cache.policy_options, "kv_cache.policy_options")
    if config.backend.name != "auto":
        errors += _named(registry, "backend", config.backend.name, "backend.name")
    for index, metric in enumerate(config.metrics.enabled):
        errors += _named(registry, "metric", metric, f"metrics.enabled[{index}]")
    failed = [record.name for record in manager.failed()]
    if errors and failed:
        errors.append(f"note: plugins that failed to load: {', '.join(failed)} (see `sagellm plugins`)")
    return errors


def _named(registry: Registry, family: str, name: str, path: str) -> list[str]:
    if name in registry.names(family):
        return []
    known = ", ".join(registry.names(family)) or "none"
    return [f"{path}: unknown {family} {name!r}; registered: {known}"]


def _options(registry: Registry, family: str, name: str, options: dict[str, Any], path: str) -> list[str]:
    try:
        structure_options(registry.get(family, name).options, options, path)
    except ConfigError as exc:
        return str(exc).splitlines()
    return []
