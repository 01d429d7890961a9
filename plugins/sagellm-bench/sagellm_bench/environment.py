"""What a benchmark ran on: hardware, library versions, the command line, machine load."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
from typing import Any, Iterable


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_info(backend: Any) -> list[dict[str, Any]]:
    """The engine's accelerator as the backend reports it (name, memory); empty on the CPU."""
    device = backend.device()
    if device.type == "cpu":
        return []
    try:
        total: int | None = int(backend.memory_info()[1])
    except NotImplementedError:
        total = None
    return [{"index": device.index or 0, "name": _device_name(device.type, device.index or 0),
             "memory_bytes": total, "backend": backend.name}]


def visible_accelerators() -> list[dict[str, Any]]:
    """Every accelerator device this machine's torch sees (for runs without an in-process engine)."""
    import torch

    if not torch.accelerator.is_available():
        return []
    kind = torch.accelerator.current_accelerator().type
    namespace = getattr(torch, kind)
    devices = []
    for index in range(torch.accelerator.device_count()):
        props = namespace.get_device_properties(index)
        devices.append({"index": index, "name": _device_name(kind, index),
                        "memory_bytes": int(getattr(props, "total_memory", 0)) or None})
    return devices


def _device_name(kind: str, index: int) -> str:
    import torch

    get_name = getattr(getattr(torch, kind, None), "get_device_name", None)
    return str(get_name(index)) if get_name is not None else f"{kind}:{index}"


def versions() -> dict[str, str]:
    import torch
    import transformers

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "sagellm": dist("sagellm")}
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    triton = dist("triton")
    if triton != "not installed":
        out["triton"] = triton
    return out


def command_line(args: argparse.Namespace | None = None) -> str:
    """The command as typed when run as ``sagellm``; otherwise rebuilt from the parsed options.

    ``args.argv`` (when the CLI records it) wins; an in-process call (tests) falls back to an
    equivalent command line built from the parser's non-default options.
    """
    argv = getattr(args, "argv", None) if args is not None else None
    if argv is not None:
        return shlex.join(["sagellm", *argv])
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program in ("sagellm", "__main__.py") and "bench" in sys.argv[1:]:
        return shlex.join(["sagellm", *sys.argv[1:]])
    if args is not None and getattr(args, "_parser", None) is not None:
        return shlex.join(["sagellm", *rebuild_argv(args._parser, args)])
    return shlex.join(sys.argv)


def rebuild_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """``sagellm`` arguments that reproduce ``args``: the parser's prog words plus non-default options."""
    words = parser.prog.split()[1:]  # "sagellm bench throughput" -> ["bench", "throughput"]
    return words + option_argv(parser._actions, args)


def option_argv(actions: Iterable[argparse.Action], args: argparse.Namespace) -> list[str]:
    """Command-line words for every optional argument of ``actions`` whose value in ``args`` is not its default."""
    words: list[str] = []
    for action in actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(action.option_strings[0] if value else flag)
        elif isinstance(action, argparse._StoreConstAction):  # store_true / store_false / store_const
            words.append(flag)
        elif isinstance(action, (argparse._AppendConstAction, argparse._CountAction)):
            words += [flag] * (len(value) if isinstance(value, list) else int(value))
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                words += [flag, *map(str, item)] if isinstance(item, list) else [flag, str(item)]
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return words


def environment(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Everything the report header prints; stored verbatim in the JSON.

    ``gpus`` stays empty until the device is known (callers set it from `device_info` once the engine
    has chosen one, or from `visible_accelerators`).
    """
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": {"model": cpu_model(), "cores": usable_cores(), "logical_cpus": os.cpu_count(),
                "memory_bytes": host_memory_bytes()},
        "gpus": [],
        "load_average": list(load) if load else None,
        "platform": platform.platform(),
        "versions": versions(),
        "command": command_line(args),
    }


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def format_environment(env: dict[str, Any]) -> list[str]:
    """Header lines: hardware, versions, load and the exact command."""
    cpu = env["cpu"]
    lines = []
    if env["gpus"]:
        gpus = ", ".join(f"{g['name']} ({_gib(g['memory_bytes'])})" for g in env["gpus"])
        lines.append(f"hardware: GPU {gpus}; host CPU {cpu['model']} ({cpu['cores']} cores)")
    else:
        lines.append(f"hardware: CPU {cpu['model']}, {cpu['cores']} cores usable "
                     f"({cpu['logical_cpus']} logical), {_gib(cpu['memory_bytes'])} RAM")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    if env.get("load_average"):
        lines.append("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in env["load_average"]))
    lines.append(f"command: {env['command']}")
    return lines
