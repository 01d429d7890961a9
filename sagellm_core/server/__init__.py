"""The OpenAI-compatible HTTP server behind `sagellm serve` (FastAPI + uvicorn)."""

from sagellm_core.server.app import ServerState, create_app, server_engine_config

__all__ = ["ServerState", "create_app", "server_engine_config"]
