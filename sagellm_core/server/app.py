"""The OpenAI-compatible FastAPI app around one engine: an in-process `LLM`, or an `EngineClient`
whose engine core runs in another process (`sagellm serve`'s default).

    app = create_app(LLM(config=server_engine_config(cfg)), served_model_name="smollm")
    uvicorn.run(app, host="127.0.0.1", port=8000)

``create_app`` also takes a function that builds the engine: the app then loads it on a thread once
it starts, so the port is bound while the model loads and ``/health`` answers 503 ``loading``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE with ``stream``),
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /tokenize``, ``POST /detokenize``,
``GET /version``, ``GET /v1/config`` (the effective engine configuration), ``GET /health``,
``GET /metrics`` (Prometheus text).
Chat templates and tokenization run in the engine's input pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from sagellm_core import __version__
from sagellm_core.config import EngineConfig
from sagellm_core.engine.client import EngineClient
from sagellm_core.inputs import ProcessedPrompt
from sagellm_core.llm import LLM
from sagellm_core.server.errors import APIError, install_error_handlers
from sagellm_core.server.jobs import Job, response_listens_for_disconnect
from sagellm_core.server.middleware import ApiKeyAuth, BodyLimit, CatchAll
from sagellm_core.server.protocol import ChatCompletionRequest, CompletionRequest, Prompt, SamplingRequest
from sagellm_core.server.responses import ChatFormatter, CompletionFormatter, Formatter
from sagellm_core.server.settings import ServerSettings
from sagellm_core.server.streaming import streaming_response
from sagellm_core.server.summary import startup_summary
from sagellm_core.server.tool_chat import ToolChatFormatter, plan_tools, template_messages
from sagellm_core.server.tools import ToolParser, make_parser

PROMETHEUS_SINK = "prometheus"
OPEN_PATHS = frozenset({"/health", "/metrics"})
log = logging.getLogger("sagellm.server")
Engine = LLM | EngineClient


def server_engine_config(config: EngineConfig) -> EngineConfig:
    """``config`` with the Prometheus metric sink enabled (``GET /metrics`` reads it)."""
    enabled = list(config.metrics.enabled)
    if PROMETHEUS_SINK in enabled:
        return config
    return config.evolve(metrics={"enabled": enabled + [PROMETHEUS_SINK]})


@attrs.define
class ServerState:
    """What the routes share: the engine (None while loading), its served name, the settings.
    ``topology``: how the engine runs (for the summary and ``/v1/config``)."""

    llm: Engine | None
    served_name: str | None
    settings: ServerSettings = attrs.field(factory=ServerSettings)
    address: str | None = None
    tool_parser: ToolParser | None = None
    created: int = attrs.field(factory=lambda: int(time.time()))
    sampling_defaults: dict[str, Any] = attrs.field(factory=dict)
    load_error: BaseException | None = None
    on_load_error: Callable[[BaseException], None] | None = None
    topology: dict[str, Any] = attrs.field(factory=dict)

    def ready(self, llm: Engine) -> None:
        """The engine is loaded: serve it, with the model's sampling defaults, and log a summary."""
        self.llm = llm
        info = llm.info
        if self.settings.generation_config == "auto":
            self.sampling_defaults = dict(info.generation_defaults)
        if self.sampling_defaults:
            log.info("sampling defaults from the model's generation config: %s (--generation-config vllm "
                     "ignores them)", self.sampling_defaults)
        self.tool_parser = make_parser(self.settings.tool_call_parser, llm.tokenizer)
        topology = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in self.topology.items())
        log.info("%s", startup_summary(info, self.served_model_name, self.address, topology))

    @property
    def served_model_name(self) -> str:
        if self.served_name is not None:
            return self.served_name
        return self.llm.info.model_name if self.llm is not None else "loading"

    @property
    def max_model_len(self) -> int:
        return self.llm.info.max_model_len if self.llm is not None else 0

    def engine(self) -> Engine:
        """The serving engine, or 503: still loading, failed to load, dead or shut down."""
        if self.llm is None:
            if self.load_error is not None:
                raise APIError(503, f"The model failed to load: {self.load_error}", "server_error",
                               code="load_failed")
            raise APIError(503, "The model is still loading; retry later.", "server_error", code="loading")
        health = self.llm.health()
        if health.status in ("dead", "stopped"):
            raise APIError(503, f"The engine is not running: {health.detail}", "server_error", code="engine_dead")
        return self.llm

    def check_model(self, model: str | None) -> None:
        """404 unless ``model`` is omitted or the served name."""
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def model_card(self) -> dict[str, Any]:
        llm = self.engine()
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "sagellm",
                "root": llm.info.model_name, "max_model_len": self.max_model_len}


async def in_pool(llm: Engine, function: Callable[..., Any], *args: Any) -> Any:
    """Await ``function(*args)`` run in the engine's input pool (off the event loop)."""
    return await asyncio.wrap_future(llm.process_inputs(function, *args))


def create_app(llm: Engine | Callable[[], Engine], *, served_model_name: str | None = None, owns_llm: bool = False,
               settings: ServerSettings | None = None, address: str | None = None,
               topology: dict[str, Any] | None = None) -> FastAPI:
    """The app serving ``llm`` (or what the function ``llm`` builds, loaded once the app starts);
    with ``owns_llm`` it shuts the engine down when the app stops. ``settings.tool_call_parser``
    names the model's tool-call format (`sagellm_core.server.tools.PARSERS`; ``auto``: detected from
    the chat template)."""
    settings = settings or ServerSettings()
    state = ServerState(None, served_model_name, settings, address, topology=dict(topology or {}))
    loader = None if isinstance(llm, (LLM, EngineClient)) else llm
    if isinstance(llm, (LLM, EngineClient)):
        state.ready(llm)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if loader is not None:
            threading.Thread(target=_load, args=(state, loader), name="sagellm-load", daemon=True).start()
        yield
        if owns_llm and state.llm is not None:
            state.llm.shutdown()

    app = FastAPI(title="sageLLM", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    open_paths = frozenset() if settings.auth_health_metrics else OPEN_PATHS
    app.add_middleware(ApiKeyAuth, keys=settings.api_keys, open_paths=open_paths)
    app.add_middleware(CatchAll)
    _add_generation_routes(app)
    _add_info_routes(app)
    from sagellm_core.server.tokenize import add_tokenize_routes

    add_tokenize_routes(app)
    return app


def _load(state: ServerState, loader: Callable[[], Engine]) -> None:
    try:
        llm = loader()
    except BaseException as exc:
        log.error("the model failed to load: %s: %s", type(exc).__name__, exc)
        state.load_error = exc
        if state.on_load_error is not None:
            state.on_load_error(exc)
        return
    state.ready(llm)


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _run(request: Request, job: Job, formatter: Formatter, body: SamplingRequest,
               state: ServerState) -> Response:
    """Answer one generation request as JSON or as an event stream."""
    job.watch(request)
    if body.stream:
        iterators = await job.open()
        if response_listens_for_disconnect(request.scope):  # one awaited receive instead of 4 polls a second
            job.stop_watching()
        return streaming_response(job, iterators, formatter, body.include_usage, state.max_model_len)
    return JSONResponse(formatter.response(await job.collect()))


def _process_prompts(llm: Engine, prompts: list[Prompt], echo: bool) -> tuple[list[ProcessedPrompt], list[str] | None]:
    """Input pool: validated prompts, and the echo text of each (token prompts decoded once valid)."""
    processed = [llm.inputs.process(prompt) for prompt in prompts]
    if not echo:
        return processed, None
    return processed, [p.text if p.text is not None else llm.inputs.decode(p.token_ids, "prompt") for p in processed]


def _add_generation_routes(app: FastAPI) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state = _state(request)
        llm = state.engine()
        state.check_model(body.model)
        params = llm.inputs.check_params(body.sampling_params(state.sampling_defaults))
        prompts, echo = await in_pool(llm, _process_prompts, llm, body.prompts(), body.echo)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        formatter = CompletionFormatter(response_id, state.served_model_name, int(time.time()), params.n, echo)
        return await _run(request, Job(llm, response_id, prompts, params), formatter, body, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state = _state(request)
        llm = state.engine()
        state.check_model(body.model)
        params = llm.inputs.check_params(body.sampling_params(state.sampling_defaults))
        parser = state.tool_parser
        assert parser is not None  # set when the engine became ready
        tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, parser,
                           params.structured_outputs is not None)
        params = tools.sampling_params(params)
        if tools.tools and getattr(llm.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template to render tools with", param="tools")
        messages = template_messages(body.template_messages())
        prompt = await in_pool(llm, llm.inputs.process_chat, messages, body.chat_template_kwargs, True, tools.tools)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        formatter: Formatter = (ChatFormatter(response_id, state.served_model_name, int(time.time()), params.n)
                                if tools.parser is None else
                                ToolChatFormatter(response_id, state.served_model_name, int(time.time()), params.n,
                                                  tools))
        return await _run(request, Job(llm, response_id, [prompt], params), formatter, body, state)


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [_state(request).model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        state = _state(request)
        state.check_model(model_id)
        return state.model_card()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/config")
    async def effective_config(request: Request) -> dict[str, Any]:
        """The configuration the engine runs with (after defaults, file, environment and flags), the KV
        pool it sized, and how the server runs (engine process, front ends, replicas)."""
        state = _state(request)
        info = state.engine().info
        return {"engine": info.config, "served_model_name": state.served_model_name, "topology": state.topology,
                "kv_cache": {"num_blocks": info.num_blocks, "block_size": info.block_size, "pools": info.num_pools,
                             "bytes": info.kv_bytes},
                "max_model_len": info.max_model_len, "dtype": info.dtype, "backend": info.backend}

    @app.get("/health")
    async def health(request: Request) -> Response:
        """200 ``{"status": "ok"}`` while serving; 503 while loading, stalled, dead or stopped."""
        state = _state(request)
        if state.llm is None:
            state.engine()  # raises the loading / load-failed 503
        status = state.llm.health()  # type: ignore[union-attr]
        if not status.ok:
            raise APIError(503, f"The engine is {status.status}: {status.detail}", "server_error",
                           code=f"engine_{status.status}")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = _state(request)
        llm = state.llm or state.engine()  # an in-process dead engine's metrics stay readable
        exposition = await asyncio.to_thread(llm.metrics_exposition)
        if exposition is None:
            raise APIError(503, "the prometheus metric sink is not enabled (or was disabled after an error)",
                           "server_error", code="metrics_unavailable")
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)
