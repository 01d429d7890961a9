"""``sagellm bench serve --launch``: start ``sagellm serve`` with this run's engine options, wait for
``/health``, stop it at the end; and the configuration that server runs with."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from sagellm_core.errors import SageLLMError

REPORTED_SECTIONS = ("model", "backend", "scheduler", "kv_cache")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(engine_args: list[str], port: int) -> list[str]:
    """The ``sagellm serve`` command line (run with this interpreter)."""
    return [sys.executable, "-m", "sagellm_core", "serve", "--port", str(port), *engine_args]


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise SageLLMError(f"`sagellm serve` exited with code {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)  # polling interval of the readiness probe
    raise SageLLMError(f"`sagellm serve` did not report healthy at {url}/health within {timeout_s:.0f} s "
                       f"(log: {log_path})")


@contextlib.contextmanager
def launched_server(engine_args: list[str], timeout_s: float, log_path: Path) -> Iterator[str]:
    """Start ``sagellm serve --port P <engine args>``; yield its base URL; stop it on exit."""
    port = free_port()
    command = server_command(engine_args, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w", encoding="utf-8") as log:
        print(f"launching: {shlex.join(command)} (log: {log_path})", flush=True)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, process, timeout_s, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def effective_server_config(engine_args: list[str]) -> dict[str, Any]:
    """The engine configuration ``sagellm serve <engine_args>`` runs with, resolved by `sagellm serve`'s own
    parser and config code (the server has no endpoint that reports it)."""
    from sagellm_core.cli import serve_cmd

    parser = argparse.ArgumentParser(prog="sagellm")
    serve_cmd.add_parser(parser.add_subparsers(dest="command"))
    config = serve_cmd.serve_config(parser.parse_args(["serve", *engine_args])).to_dict()
    return {section: config[section] for section in REPORTED_SECTIONS}


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"scheduler": {"max_num_seqs": 512}}`` -> ``{"scheduler.max_num_seqs": 512}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat
