"""`sagellm serve`: an OpenAI-compatible server (completions, chat, models, health, Prometheus metrics)."""

from __future__ import annotations

import argparse

from sagellm_core.cli.common import add_engine_options, engine_config
from sagellm_core.config import EngineConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_options(parser)
    parser.add_argument("--host", default=None, help="bind address (default: server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: server.port, 8000)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the model's directory name)")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="bound of the waiting queue; beyond it requests get 503 (scheduler.max_waiting)")
    parser.add_argument("--tool-call-parser", default="auto", choices=["auto", "hermes", "llama3_json", "mistral"],
                        help="the model's tool-call format (default: detected from the chat template)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)


def serve_config(args: argparse.Namespace) -> EngineConfig:
    """The engine options plus the server section, the waiting bound and the Prometheus sink."""
    from sagellm_core.server import server_engine_config

    config = engine_config(args)
    server = {key: value for key, value in (("host", args.host), ("port", args.port),
                                            ("served_model_name", args.served_model_name)) if value is not None}
    sections: dict = {"server": server} if server else {}
    if args.max_waiting is not None:
        sections["scheduler"] = {"max_waiting": args.max_waiting}
    return server_engine_config(config.evolve(**sections) if sections else config)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from sagellm_core.llm import LLM
    from sagellm_core.server import create_app

    config = serve_config(args)
    llm = LLM(config=config)
    try:
        app = create_app(llm, served_model_name=config.server.served_model_name, owns_llm=True,
                         tool_call_parser=args.tool_call_parser)
        uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=args.log_level)
    finally:
        llm.shutdown()
    return 0
