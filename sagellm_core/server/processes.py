"""How `sagellm serve` runs: the engine core in its own process (or one per data-parallel replica),
and the front end (HTTP, tokenization, detokenization, SSE) in the server's process, or in several
front-end processes sharing the listening socket (``--api-server-count``).

    launcher = EngineLauncher(config, ServeTopology(api_server_count=1, data_parallel_size=2))
    launcher.start()
    client = launcher.client(0, input_workers=2, stall_timeout_s=120.0, owns_engines=True)

Replica ``i`` runs on device ``backend.device_index + i``; on the CPU backend (or a single device)
the replicas share it, each with its own KV pool sized from its share of the memory settings.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
from typing import Any

import attrs

from sagellm_core.config import EngineConfig
from sagellm_core.engine.client import EngineClient
from sagellm_core.engine.info import EngineInfo
from sagellm_core.engine.process import EngineAddresses, EngineProcess, engine_addresses, new_ipc_directory
from sagellm_core.errors import ConfigError

log = logging.getLogger("sagellm.server")


@attrs.frozen
class ServeTopology:
    """``engine_process``: the engine core in processes of its own (False: in the server's process).
    ``api_server_count``: front-end processes (``api_server_count_source``: ``option`` when given,
    ``derived`` by `sagellm_core.server.frontends`). ``data_parallel_size``: engine replicas."""

    engine_process: bool = True
    api_server_count: int = 1
    data_parallel_size: int = 1
    api_server_count_source: str = "option"

    def __attrs_post_init__(self) -> None:
        if self.api_server_count < 1:
            raise ConfigError(f"--api-server-count must be >= 1, got {self.api_server_count}")
        if not self.engine_process and (self.api_server_count > 1 or self.data_parallel_size > 1):
            raise ConfigError("--api-server-count and --data-parallel-size need the engine process "
                              "(drop --no-engine-process)")

    def describe(self) -> dict[str, Any]:
        """For the start-up summary and ``/v1/config``."""
        return {"engine_process": self.engine_process, "api_server_count": self.api_server_count,
                "api_server_count_source": self.api_server_count_source,
                "data_parallel_size": self.data_parallel_size}


def replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """Replica ``index``'s config: the next device where the backend has several."""
    if index == 0 or config.backend.name == "cpu":
        return config
    return config.evolve(backend={"device_index": config.backend.device_index + index})


class EngineLauncher:
    """Starts the engine processes of one server and makes front-end clients for them."""

    def __init__(self, config: EngineConfig, topology: ServeTopology) -> None:
        self.config = config
        self.topology = topology
        self.directory = new_ipc_directory()
        self.engine_inputs, self.frontend_outputs = engine_addresses(
            self.directory, topology.data_parallel_size, topology.api_server_count)
        self.processes: list[EngineProcess] = []
        self.infos: list[EngineInfo] = []

    def start(self) -> list[EngineInfo]:
        """Spawn every engine process and wait until all are built (raises the first build error)."""
        try:
            for index, address in enumerate(self.engine_inputs):
                addresses = EngineAddresses(address, tuple(self.frontend_outputs))
                self.processes.append(EngineProcess.start(replica_config(self.config, index), addresses,
                                                          name=f"sagellm-engine-{index}"))
            self.infos = [process.wait_ready() for process in self.processes]
        except BaseException:
            self.stop()
            raise
        log.info("engine process(es) ready: pid %s", ", ".join(str(p.pid) for p in self.processes))
        return self.infos

    def client(self, frontend_index: int, *, input_workers: int, stall_timeout_s: float | None,
               owns_engines: bool) -> EngineClient:
        """A front end of these engines (``owns_engines``: its shutdown stops them)."""
        return EngineClient(self.config, self.infos, self.engine_inputs, self.frontend_outputs[frontend_index],
                            frontend_index=frontend_index, input_workers=input_workers,
                            stall_timeout_s=stall_timeout_s, processes=self.processes if owns_engines else ())

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket the front-end processes share (uvicorn accepts on it in each)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@attrs.frozen
class FrontendSpec:
    """What one front-end process needs: the engines' facts and addresses, and the server's options."""

    index: int
    config: EngineConfig
    infos: list[EngineInfo]
    engine_inputs: list[str]
    frontend_outputs: list[str]
    settings: Any
    served_model_name: str | None
    address: str
    topology: dict[str, Any]
    input_workers: int
    stall_timeout_s: float | None
    log_level: str


def run_frontend(spec: FrontendSpec, sock: socket.socket) -> None:
    """A front-end process: the app over ``sock``, its client connected to the running engines."""
    from sagellm_core.cli.serve_cmd import make_server
    from sagellm_core.server import create_app

    logging.basicConfig(level=spec.log_level.upper(),
                        format="%(levelname)s %(name)s[front end %(process)d]: %(message)s")

    # Connected before accepting: the socket is shared, so a front end that accepted while still loading
    # would answer the clients the ready ones could serve with 503s.
    client = EngineClient(spec.config, spec.infos, spec.engine_inputs, spec.frontend_outputs[spec.index],
                          frontend_index=spec.index, input_workers=spec.input_workers,
                          stall_timeout_s=spec.stall_timeout_s)
    app = create_app(client, served_model_name=spec.served_model_name, owns_llm=True, settings=spec.settings,
                     address=spec.address, topology=spec.topology)
    server = make_server(app, spec.config, spec.settings, spec.log_level)
    server.run(sockets=[sock])


def run_frontends(launcher: EngineLauncher, sock: socket.socket, make_spec: Any) -> int:
    """Spawn ``api_server_count`` front ends on ``sock`` and wait for them; SIGTERM is passed on to them
    (each drains), SIGINT reaches them from the terminal. Returns 0 when every front end stopped on
    a signal or by itself, else 1."""
    context = multiprocessing.get_context("spawn")
    frontends = [context.Process(target=run_frontend, args=(make_spec(index), sock), name=f"sagellm-frontend-{index}")
                 for index in range(launcher.topology.api_server_count)]
    for process in frontends:
        process.start()
    log.info("%d front-end processes (pid %s) share the port", len(frontends),
             ", ".join(str(p.pid) for p in frontends))

    def forward(signum: int, _: Any) -> None:
        for process in frontends:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, lambda *_: None)  # the front ends got it from the terminal too
    for process in frontends:
        process.join()
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)  # uvicorn re-raises the signal it drained on
    return 0 if all(process.exitcode in stopped for process in frontends) else 1
