"""A per-request stream of outputs, consumable as a sync or an async iterator."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator, Iterator

from sagellm_core.outputs import RequestOutput

_END = object()


class RequestStream:
    """Filled by the engine loop thread; read by one consumer, from a thread or an event loop."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_text: str | None = None  # filled into outputs (the engine only sees token ids)
        self.abort_requested = False
        self.ended = False
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Queue | None = None
        self.final: RequestOutput | None = None

    # ---- producer side (engine thread) ---------------------------------------------------------
    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            if item.prompt is None:
                item.prompt = self.prompt_text
            if item.finished:
                self.final = item
        with self._lock:
            if not self.ended:
                self._push(item)

    def _push(self, item: object) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)  # type: ignore[union-attr]
            except RuntimeError:  # the consumer's event loop is closed: nobody reads any more
                pass
        else:
            self._sync.put(item)

    def close(self) -> None:
        self.put_end()

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error`` unless it has ended already (safe from any thread, twice)."""
        with self._lock:
            if not self.ended:
                self.ended = True
                self._push(error)
                self._push(_END)

    def put_end(self) -> None:
        with self._lock:
            if not self.ended:
                self.ended = True
                self._push(_END)

    # ---- consumer side -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            item = self._sync.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _bind_loop(self) -> None:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                self._async = asyncio.Queue()
                while not self._sync.empty():
                    self._async.put_nowait(self._sync.get())

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:  # type: ignore[override]
        self._bind_loop()
        assert self._async is not None
        while True:
            item = await self._async.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
