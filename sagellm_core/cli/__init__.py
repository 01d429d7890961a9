"""The `sagellm` command line. Each built-in sub-command lives in its own module exposing
``add_parser(subparsers)``; plugins add more through the ``sagellm_register_commands`` hook."""

from __future__ import annotations

import argparse
import importlib
import sys

from sagellm_core.cli.plugin_commands import add_plugin_commands
from sagellm_core.errors import SageLLMError

COMMAND_MODULES = (
    "sagellm_core.cli.generate_cmd",
    "sagellm_core.cli.chat_cmd",
    "sagellm_core.cli.serve_cmd",
    "sagellm_core.cli.plugins_cmd",
    "sagellm_core.cli.config_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    from sagellm_core import __version__

    parser = argparse.ArgumentParser(prog="sagellm", description="sageLLM: a pluggable LLM inference engine")
    parser.add_argument("--version", action="version", version=f"sagellm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # sub-command not built yet
            raise
        module.add_parser(subparsers)
    add_plugin_commands(subparsers, taken=subparsers.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return int(args.func(args) or 0)
    except SageLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sagellm plugins | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
