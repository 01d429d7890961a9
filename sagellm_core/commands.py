"""What a command plugin registers: one ``sagellm`` sub-command (hook ``sagellm_register_commands``)."""

from __future__ import annotations

import argparse
import re
from typing import Any, Callable

import attrs

COMMAND_NAME = re.compile(r"[a-z][a-z0-9-]*")


def _check_name(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not COMMAND_NAME.fullmatch(value):
        raise ValueError(f"command {attribute.name} must be lower-case letters, digits and dashes, got {value!r}")


def _check_callable(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not callable(value):
        raise ValueError(f"command {attribute.name} must be callable, got {type(value).__name__}")


@attrs.frozen
class CommandSpec:
    """``sagellm <name>``: ``add_arguments(parser)`` declares its options, ``run(args)`` executes it."""

    name: str = attrs.field(validator=_check_name)
    add_arguments: Callable[[argparse.ArgumentParser], None] = attrs.field(validator=_check_callable)
    run: Callable[[argparse.Namespace], int | None] = attrs.field(validator=_check_callable)
    help: str = ""
