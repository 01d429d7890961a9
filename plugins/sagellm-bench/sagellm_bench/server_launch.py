"""``sagellm bench serve --launch``: start ``sagellm serve`` with this run's engine options, wait for
``/health``, stop it at the end; and the configuration that server reports it runs with."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from sagellm_core.errors import SageLLMError

REPORTED_SECTIONS = ("model", "backend", "scheduler", "kv_cache")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(engine_args: list[str], port: int) -> list[str]:
    """The ``sagellm serve`` command line (run with this interpreter)."""
    return [sys.executable, "-m", "sagellm_core", "serve", "--port", str(port), *engine_args]


def process_tree_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of ``root_pid`` and each of its descendants, keyed ``"pid name"``; empty
    where ``/proc`` is not there. Shows which of a server's processes is busy during a run."""
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        fields = text[name_end + 2:].split()
        stats[int(entry.name)] = [text[text.index("(") + 1:name_end], *fields]
        parents[int(entry.name)] = int(fields[1])
    tick = os.sysconf("SC_CLK_TCK")
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return {f"{pid} {stats[pid][0]}": (int(stats[pid][12]) + int(stats[pid][13])) / tick
            for pid in sorted(tree) if pid in stats}


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


class LaunchedServer(NamedTuple):
    url: str
    pid: int


@contextlib.contextmanager
def launched_server(engine_args: list[str], timeout_s: float, log_path: Path) -> Iterator[LaunchedServer]:
    """Start ``sagellm serve --port P <engine args>``; yield its base URL and pid; stop it on exit."""
    port = free_port()
    command = server_command(engine_args, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w", encoding="utf-8") as log:
        print(f"launching: {shlex.join(command)} (log: {log_path})", flush=True)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(url, process, timeout_s, log_path)
            yield LaunchedServer(url, process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fetch_server_config(base_url: str, launch_args: Iterable[str] = ()) -> dict[str, Any] | None:
    """The configuration the server at ``base_url`` runs with, as it reports it (``GET /v1/config``,
    with the API key of ``--api-key`` in ``launch_args`` or ``SAGELLM_API_KEY``): the engine sections
    of the report plus its topology (engine process, front ends, replicas). None when the server does
    not report one (not sageLLM, or an older one)."""
    import httpx

    key = _api_key(list(launch_args))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{base_url}/v1/config", headers=headers, timeout=30.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    body = response.json()
    config = {section: body["engine"][section] for section in REPORTED_SECTIONS if section in body["engine"]}
    config["parallel"] = body["engine"].get("parallel", {})
    config["topology"] = body.get("topology", {})
    config["kv_cache_sized"] = body.get("kv_cache", {})
    return config


def _api_key(launch_args: list[str]) -> str | None:
    for flag, value in zip(launch_args, launch_args[1:]):
        if flag == "--api-key":
            return value
    keys = [key.strip() for key in os.environ.get("SAGELLM_API_KEY", "").split(",") if key.strip()]
    return keys[0] if keys else None


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
