"""`sagellm serve [MODEL]`: an OpenAI-compatible server (completions, chat, tokenize, models, health,
Prometheus metrics). The port is bound first; the model loads meanwhile (``/health`` says 503).

By default the engine core runs in a process of its own and this process is the front end (HTTP,
tokenization, detokenization, SSE); ``--api-server-count N`` runs N front-end processes on one
listening socket, ``--data-parallel-size N`` N engine processes behind them, and
``--no-engine-process`` keeps everything in one process (`sagellm_core.server.processes`)."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

from sagellm_core.cli.common import add_engine_options, engine_config
from sagellm_core.config import EngineConfig
from sagellm_core.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the model to serve (as `vllm serve MODEL`; same as --model)")
    add_engine_options(parser)
    parser.add_argument("--host", default=None, help="bind address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: server.port, 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the model's directory name)")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="bound of the waiting queue; beyond it requests get 503 (scheduler.max_waiting)")
    parser.add_argument("--api-key", action="append", default=None,
                        help="accept only requests with 'Authorization: Bearer KEY' (repeatable; default: "
                             "$SAGELLM_API_KEY, comma-separated; none: no authentication)")
    parser.add_argument("--auth-health-metrics", action="store_true",
                        help="/health and /metrics need the API key too (open by default)")
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="larger request bodies get 413 (default: 8 MiB)")
    parser.add_argument("--generation-config", default="auto", choices=["auto", "vllm"],
                        help="auto: the model's generation_config.json sampling defaults apply to requests "
                             "that do not set them; vllm: ignore them")
    parser.add_argument("--drain-timeout", type=float, default=None,
                        help="seconds requests in flight get to finish on SIGTERM (default 30); "
                             "a second SIGTERM or SIGINT exits at once")
    parser.add_argument("--input-workers", type=int, default=2,
                        help="threads that render chat templates and tokenize (default 2)")
    parser.add_argument("--stall-timeout", type=float, default=120.0,
                        help="seconds without engine progress while requests wait before /health says "
                             "503 (0: no watchdog)")
    parser.add_argument("--tool-call-parser", default="auto", choices=["auto", "hermes", "llama3_json", "mistral"],
                        help="the model's tool-call format (default: detected from the chat template)")
    parser.add_argument("--no-engine-process", action="store_true",
                        help="run the engine core in the server's process (one process and one GIL for HTTP, "
                             "text and the step loop; the default runs it in a process of its own)")
    parser.add_argument("--api-server-count", type=int, default=None,
                        help="front-end processes (HTTP, tokenization, detokenization) sharing the port, all "
                             "talking to the engine process(es) (default: derived; 2 per engine process on "
                             "an accelerator as the host's cores allow, 1 on the CPU backend)")
    parser.add_argument("--data-parallel-size", type=int, default=None,
                        help="engine replicas (processes) behind the front end, requests routed by prefix "
                             "affinity (parallel.data_parallel_size; replica i on device device_index + i, "
                             "all on one device when there is one)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)


def serve_config(args: argparse.Namespace) -> EngineConfig:
    """The engine options plus the server section, the waiting bound and the Prometheus sink."""
    from sagellm_core.server import server_engine_config

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ConfigError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    config = engine_config(args)
    server = {key: value for key, value in (("host", args.host), ("port", args.port),
                                            ("served_model_name", args.served_model_name)) if value is not None}
    sections: dict = {"server": server} if server else {}
    if args.max_waiting is not None:
        sections["scheduler"] = {"max_waiting": args.max_waiting}
    if getattr(args, "data_parallel_size", None) is not None:
        sections["parallel"] = {"data_parallel_size": args.data_parallel_size}
    return server_engine_config(config.evolve(**sections) if sections else config)


def server_settings(args: argparse.Namespace) -> Any:
    """The server-only settings (API keys from the options or ``SAGELLM_API_KEY``)."""
    from sagellm_core.server.settings import ServerSettings

    return ServerSettings.from_env(api_keys=args.api_key, auth_health_metrics=args.auth_health_metrics,
                                   max_request_bytes=args.max_request_bytes,
                                   generation_config=args.generation_config, drain_timeout_s=args.drain_timeout,
                                   tool_call_parser=getattr(args, "tool_call_parser", None))


def make_server(app: Any, config: EngineConfig, settings: Any, log_level: str) -> Any:
    """A uvicorn server that drains for ``settings.drain_timeout_s`` on the first SIGTERM / SIGINT and
    exits at once on the second."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # second signal, whichever
                self.force_exit = True
            else:
                logging.getLogger("sagellm.server").info(
                    "%s: draining requests in flight (at most %.0f s; signal again to exit now)",
                    signal.Signals(sig).name, settings.drain_timeout_s)
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(app, host=config.server.host, port=config.server.port, log_level=log_level,
                               timeout_graceful_shutdown=settings.drain_timeout_s)
    return DrainingServer(uv_config)


def serve_topology(args: argparse.Namespace, config: EngineConfig, *, device_type: str | None = None) -> Any:
    """Where the engine core and the front ends run (``--api-server-count`` derived when not given;
    ``device_type``: the backend's, else probed)."""
    from sagellm_core.server.frontends import resolve_frontends
    from sagellm_core.server.processes import ServeTopology

    engine_process = not args.no_engine_process
    frontends = resolve_frontends(args.api_server_count, config, engine_process=engine_process,
                                  device_type=device_type)
    logging.getLogger("sagellm.server").info("front-end processes: %d (%s: %s)", frontends.count, frontends.source,
                                             frontends.reason)
    return ServeTopology(engine_process=engine_process, api_server_count=frontends.count,
                         data_parallel_size=config.parallel.data_parallel_size,
                         api_server_count_source=frontends.source)


def run(args: argparse.Namespace) -> int:
    config = serve_config(args)
    settings = server_settings(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    topology = serve_topology(args, config)
    stall = args.stall_timeout if args.stall_timeout and args.stall_timeout > 0 else None
    if topology.api_server_count > 1:
        return _run_frontend_processes(args, config, settings, topology, stall)
    return _run_one_process_front(args, config, settings, topology, stall)


def _run_one_process_front(args: argparse.Namespace, config: EngineConfig, settings: Any, topology: Any,
                           stall: float | None) -> int:
    """The front end in this process: the engine in-process (``--no-engine-process``) or in its own."""
    from sagellm_core.llm import LLM
    from sagellm_core.server import create_app
    from sagellm_core.server.processes import EngineLauncher

    address = f"http://{config.server.host}:{config.server.port}"
    launchers: list[EngineLauncher] = []

    def load() -> Any:
        if not topology.engine_process:
            return LLM(config=config, input_workers=args.input_workers, stall_timeout_s=stall)
        launcher = EngineLauncher(config, topology)
        launchers.append(launcher)
        launcher.start()
        return launcher.client(0, input_workers=args.input_workers, stall_timeout_s=stall, owns_engines=True)

    app = create_app(load, served_model_name=config.server.served_model_name, owns_llm=True, settings=settings,
                     address=address, topology=topology.describe())
    server = make_server(app, config, settings, args.log_level)
    state = app.state.server

    def stop(_: BaseException) -> None:
        server.should_exit = True

    state.on_load_error = stop
    try:
        server.run()
    finally:
        if state.llm is not None:
            state.llm.shutdown()
        for launcher in launchers:  # engines still starting when a signal came, too
            launcher.stop()
    if state.load_error is not None:
        raise state.load_error
    return 0


def _run_frontend_processes(args: argparse.Namespace, config: EngineConfig, settings: Any, topology: Any,
                            stall: float | None) -> int:
    """``--api-server-count N``: bind the port here, start the engines, then N front-end processes on
    the port; this process only supervises. The port answers once the front ends run."""
    from sagellm_core.server.processes import EngineLauncher, FrontendSpec, bind_socket, run_frontends

    sock = bind_socket(config.server.host, config.server.port)
    launcher = EngineLauncher(config, topology)
    try:
        infos = launcher.start()

        def spec(index: int) -> FrontendSpec:
            return FrontendSpec(index, config, infos, launcher.engine_inputs, launcher.frontend_outputs, settings,
                                config.server.served_model_name, f"http://{config.server.host}:{config.server.port}",
                                topology.describe(), args.input_workers, stall, args.log_level)

        return run_frontends(launcher, sock, spec)
    finally:
        launcher.stop()
        sock.close()
