"""ASGI middleware: API-key authentication, the request body limit, and a last-resort 500 that
keeps the connection and hides internals (the traceback is logged once)."""

from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from sagellm_core.server.errors import APIError

log = logging.getLogger("sagellm.server")
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    """Whether ``token`` is one of ``keys``, comparing every key in constant time."""
    given = token.encode("utf-8", "surrogatepass")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8"))
    return matched


class ApiKeyAuth:
    """401 in OpenAI's error shape unless ``Authorization: Bearer <key>`` names an accepted key."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], open_paths: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
            message = "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'."
            response = APIError(401, message, code="invalid_api_key").response()
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised while the body is read (FastAPI passes HTTP exceptions through); answered with 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the server's limit of {limit} bytes.")


class BodyLimit:
    """413 for a body over ``limit`` bytes: at once from ``Content-Length``, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await APIError(413, str(BodyTooLarge(self.limit).detail), code="request_too_large").response()(
                scope, receive, send)
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


class CatchAll:
    """Any exception no handler took becomes a generic 500 (OpenAI's shape) instead of a reset
    connection; the traceback is logged here once. After a response started nothing can be sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                error = APIError(500, "The server had an error while processing your request.", "server_error",
                                 code="internal_error")
                await error.response()(scope, receive, send)
