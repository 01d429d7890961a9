"""The OpenAI-compatible FastAPI app around one `LLM`.

    app = create_app(LLM(config=server_engine_config(cfg)), served_model_name="smollm")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE with ``stream``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus text).
"""

from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from sagellm_core.chat import chat_prompt_ids
from sagellm_core.config import EngineConfig
from sagellm_core.errors import SageLLMError
from sagellm_core.llm import LLM
from sagellm_core.server.errors import APIError, install_error_handlers
from sagellm_core.server.jobs import Job
from sagellm_core.server.protocol import ChatCompletionRequest, CompletionRequest, Prompt, SamplingRequest
from sagellm_core.server.responses import ChatFormatter, CompletionFormatter, Formatter
from sagellm_core.server.streaming import streaming_response
from sagellm_core.server.tool_chat import ToolChatFormatter, plan_tools, template_messages
from sagellm_core.server.tools import ToolParser, make_parser

PROMETHEUS_SINK = "prometheus"


def server_engine_config(config: EngineConfig) -> EngineConfig:
    """``config`` with the Prometheus metric sink enabled (``GET /metrics`` reads it)."""
    enabled = list(config.metrics.enabled)
    if PROMETHEUS_SINK in enabled:
        return config
    return config.evolve(metrics={"enabled": enabled + [PROMETHEUS_SINK]})


@attrs.define
class ServerState:
    """What the routes share: the engine, the name it is served under, and when the server started."""

    llm: LLM
    served_model_name: str
    tool_parser: ToolParser
    created: int = attrs.field(factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is omitted or the served name."""
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def prompt_text(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.llm.tokenizer is None:
            raise APIError(400, "echo of token prompts needs a tokenizer", param="echo")
        return self.llm.tokenizer.decode(prompt)

    def chat_prompt(self, request: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None) -> list[int]:
        messages = template_messages(request.template_messages())
        if tools and getattr(self.llm.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template to render tools with", param="tools")
        try:
            return chat_prompt_ids(self.llm.tokenizer, messages, tools=tools)
        except SageLLMError:
            raise
        except Exception as exc:  # the template itself rejects the conversation (roles, order, ...)
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None

    def model_card(self) -> dict[str, Any]:
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "sagellm",
                "root": self.llm.engine.model_name, "max_model_len": self.max_model_len}

    def engine_alive(self) -> bool:
        # NOTE: LLM has no public liveness flag yet; its loop thread is the engine.
        return self.llm.is_running


def create_app(llm: LLM, *, served_model_name: str | None = None, owns_llm: bool = False,
               tool_call_parser: str = "auto") -> FastAPI:
    """The app serving ``llm``; with ``owns_llm`` it shuts the engine down when the app stops.
    ``tool_call_parser`` names the model's tool-call format (`sagellm_core.server.tools.PARSERS`;
    ``auto``: detected from the chat template)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_llm:
            llm.shutdown()

    app = FastAPI(title="sageLLM", lifespan=lifespan)
    app.state.server = ServerState(llm, served_model_name or llm.engine.model_name,
                                   make_parser(tool_call_parser, llm.tokenizer))
    install_error_handlers(app)
    _add_generation_routes(app)
    _add_info_routes(app)
    return app


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _run(request: Request, job: Job, formatter: Formatter, body: SamplingRequest,
               state: ServerState) -> Response:
    """Answer one generation request as JSON or as an event stream."""
    job.watch(request)
    if body.stream:
        iterators = await job.open()
        return streaming_response(job, iterators, formatter, body.include_usage, state.max_model_len)
    return JSONResponse(formatter.response(await job.collect()))


def _add_generation_routes(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state = _state(request)
        state.check_model(body.model)
        params = body.sampling_params()
        prompts = body.prompts()
        echo = [state.prompt_text(p) for p in prompts] if body.echo else None
        response_id = f"cmpl-{uuid.uuid4().hex}"
        formatter = CompletionFormatter(response_id, state.served_model_name, int(time.time()), params.n, echo)
        return await _run(request, Job(state.llm, response_id, prompts, params), formatter, body, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state = _state(request)
        state.check_model(body.model)
        params = body.sampling_params()
        tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, state.tool_parser,
                           params.structured_outputs is not None)
        params = tools.sampling_params(params)
        prompt = state.chat_prompt(body, tools.tools)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        formatter: Formatter = (ChatFormatter(response_id, state.served_model_name, int(time.time()), params.n)
                                if tools.parser is None else
                                ToolChatFormatter(response_id, state.served_model_name, int(time.time()), params.n,
                                                  tools))
        return await _run(request, Job(state.llm, response_id, [prompt], params), formatter, body, state)


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [_state(request).model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        state = _state(request)
        state.check_model(model_id)
        return state.model_card()

    @app.get("/health")
    async def health(request: Request) -> Response:
        if not _state(request).engine_alive():
            raise APIError(503, "the engine is not running", "server_error", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        sink = _state(request).llm.engine.metric_sinks.get(PROMETHEUS_SINK)
        if sink is None:
            raise APIError(503, "the prometheus metric sink is not enabled (or was disabled after an error)",
                           "server_error", code="metrics_unavailable")
        return Response(sink.exposition(), media_type=CONTENT_TYPE_LATEST)
