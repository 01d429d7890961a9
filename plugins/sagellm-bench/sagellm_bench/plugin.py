"""The plugin module of the ``sagellm-bench`` distribution: adds ``sagellm bench`` to the CLI."""

from __future__ import annotations

from typing import Any

from sagellm_core.hookspecs import hookimpl

SAGELLM_PLUGIN_API = ">=1.0,<2"


@hookimpl
def sagellm_register_commands(register: Any) -> None:
    from sagellm_bench import cli

    register("bench", cli.add_arguments, cli.run, help=cli.HELP)
