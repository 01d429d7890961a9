"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

Engine errors map as: `PromptTooLongError` -> 400 ``context_length_exceeded``, other
`InvalidRequestError` -> 400, `EngineOverloadedError` -> 503, `EngineDeadError` -> 503, any other
`SageLLMError` -> 500 with a generic message (the error is logged with its traceback). Request-body
validation (pydantic, malformed JSON) is 400, not FastAPI's 422. Exceptions nothing handles become a
generic 500 in `middleware.CatchAll`, which keeps the connection open.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sagellm_core.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
    SageLLMError,
)

log = logging.getLogger("sagellm.server")


class APIError(Exception):
    """An error the server answers with OpenAI's error JSON and ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_engine_error(exc: SageLLMError, max_model_len: int) -> APIError:
    """The API error for an error raised by the engine (request validation, overload, shutdown)."""
    if isinstance(exc, PromptTooLongError):
        return APIError(400, f"This model's maximum context length is {max_model_len} tokens. {exc}",
                        param="prompt", code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, f"The server is overloaded: {exc}; retry later.", "overloaded_error",
                        code="engine_overloaded")
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not running: {exc}", "server_error", code="engine_dead")
    log.error("request failed with %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, "The server had an error while processing your request.", "server_error",
                    code="internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """400 naming the first bad field (``messages.0.role``) or saying the body is not JSON."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first.get('msg', '')}")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid body"))
    return APIError(400, message, param=param)


def _http_error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app returns OpenAI-shaped."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(SageLLMError)
    async def _engine_error(request: Request, exc: SageLLMError) -> JSONResponse:
        return from_engine_error(exc, request.app.state.server.max_model_len).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "request_too_large" if exc.status_code == 413 else None
        return APIError(exc.status_code, str(exc.detail), _http_error_type(exc.status_code), code=code).response()
