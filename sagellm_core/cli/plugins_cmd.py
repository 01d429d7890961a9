"""``sagellm plugins [--json] [--backend NAME]``: installed plugins, their hooks and load status, what
they registered, every backend's probe, and which backend would be selected and why."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import attrs

from sagellm_core import PLUGIN_API_VERSION
from sagellm_core.backend_selection import BackendProbe, probe_all, select_backend
from sagellm_core.errors import BackendUnavailableError
from sagellm_core.plugin_manager import SageLLMPluginManager, create_plugin_manager

NON_BACKEND_FAMILIES = ("kv_policy", "kv_tier", "scheduler", "metric")


def add_parser(subparsers: Any) -> None:
    """Register the ``plugins`` sub-command."""
    parser = subparsers.add_parser(
        "plugins", help="list plugins, their hooks and status, backend probes and the selected backend"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="show the outcome of choosing this backend explicitly (default: $SAGELLM_BACKEND or auto)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = collect_report(create_plugin_manager(), args.backend)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


# ---- report ---------------------------------------------------------------------------------------
def collect_report(manager: SageLLMPluginManager, cli_backend: str | None = None) -> dict[str, Any]:
    """Everything `sagellm plugins` shows, as JSON-ready data.

    ``cli_backend`` is ``--backend``; without it ``SAGELLM_BACKEND`` applies, as in the engine.
    """
    registry = manager.registry  # collect first: a registration hook that raises marks its plugin failed
    requested, source = _requested_backend(cli_backend)
    selected: dict[str, Any] | None = None
    error: str | None = None
    try:
        choice = select_backend(manager, requested)
        probes = list(choice.probes)
        reason = choice.reason if source is None else f"{choice.reason} via {source}"
        selected = {"name": choice.spec.name, "reason": reason}
    except BackendUnavailableError as exc:
        probes = probe_all(manager)
        error = str(exc)
    return {
        "plugin_api": PLUGIN_API_VERSION,
        "plugins": [attrs.asdict(record) for record in manager.records.values()],
        "registered": {
            family: [{"name": r.name, "plugin": r.plugin} for r in registry.all(family)]
            for family in NON_BACKEND_FAMILIES
        },
        "backends": [_backend_row(manager, probe) for probe in probes],
        "selected": selected,
        "selection_error": error,
    }


def _requested_backend(cli_backend: str | None) -> tuple[str | None, str | None]:
    """(explicit backend name or None for auto, where the name came from)."""
    if cli_backend and cli_backend != "auto":
        return cli_backend, "--backend"
    if cli_backend == "auto":
        return "auto", None
    env = os.environ.get("SAGELLM_BACKEND") or None
    if env and env != "auto":
        return env, "SAGELLM_BACKEND"
    return None, None


def _backend_row(manager: SageLLMPluginManager, probe: BackendProbe) -> dict[str, Any]:
    spec = manager.registry.get("backend", probe.name).spec
    assert spec is not None  # backend registrations always carry their spec
    return {
        "name": probe.name,
        "priority": probe.priority,
        "plugin": probe.plugin,
        "available": probe.result.available,
        "detail": probe.result.detail,
        "device_count": probe.result.device_count,
        "device_type": spec.device_type,
        "dist_backend": spec.dist_backend,
        "visible_devices_env": spec.visible_devices_env,
    }


# ---- text rendering -------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned columns sized to their widest cell."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def short_hook(name: str) -> str:
    """``sagellm_register_schedulers`` -> ``schedulers``; ``sagellm_configure`` -> ``configure``."""
    for prefix in ("sagellm_register_", "sagellm_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _plugin_lines(plugins: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    rows = [(p["name"], p["distribution"], p["version"] or "-", p["status"],
             ", ".join(short_hook(h) for h in p["hooks"]) or "-") for p in plugins]
    table = format_table(("NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"), rows)
    lines.append(table[0])
    for plugin, line in zip(plugins, table[1:]):
        lines.append(line)
        if plugin["error"]:
            lines.append(f"      {plugin['status']}: {plugin['error']}")
    return lines


def _registered_lines(registered: dict[str, list[dict[str, str]]]) -> list[str]:
    lines = []
    for family, entries in registered.items():
        by_plugin: dict[str, list[str]] = {}
        for entry in entries:
            by_plugin.setdefault(entry["plugin"], []).append(entry["name"])
        text = "; ".join(f"{', '.join(names)} ({plugin})" for plugin, names in by_plugin.items())
        lines.append(f"  {family + ':':<11} {text or '(none)'}")
    return lines


def _backend_lines(backends: list[dict[str, Any]]) -> list[str]:
    if not backends:
        return ["  (no backends registered)"]
    rows = [(b["name"], b["priority"], "yes" if b["available"] else "no", b["device_type"], b["dist_backend"],
             b["detail"]) for b in backends]
    return format_table(("NAME", "PRIORITY", "AVAILABLE", "DEVICE", "DIST", "DETAIL"), rows)


def render_text(report: dict[str, Any]) -> str:
    """The human-readable form of `collect_report`'s data."""
    lines = [f"Plugins (sageLLM plugin API {report['plugin_api']})"]
    lines += _plugin_lines(report["plugins"])
    lines += ["", "Registered"] + _registered_lines(report["registered"])
    lines += ["", "Backends (highest priority first)"] + _backend_lines(report["backends"])
    lines.append("")
    if report["selected"] is not None:
        lines.append(f"Selected backend: {report['selected']['name']} - {report['selected']['reason']}")
    else:
        lines.append(f"No backend can be selected: {report['selection_error']}")
    return "\n".join(lines)
