"""A per-request stream of outputs, consumable as a sync or an async iterator.

An async consumer is woken through its event loop's `LoopWaker`: one ``call_soon_threadsafe`` (one
write to the loop's wake-up pipe) for every stream filled since the loop last ran, not one per
output. When it reads, the outputs queued since its last read are merged into one (`coalesce`: the
deltas concatenated, the cumulative fields of the latest), as vLLM's output collector does: a
consumer that falls behind (a saturated server front end) does one chunk's work for several tokens.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections import deque
from typing import AsyncIterator, Iterator

from sagellm_core.outputs import RequestOutput

_END = object()


def coalesce(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """``later`` carrying ``earlier``'s deltas too (cumulative text, ids and logprobs are ``later``'s)."""
    previous = {completion.index: completion for completion in earlier.outputs}
    for completion in later.outputs:
        before = previous.get(completion.index)
        if before is not None:
            completion.delta_text = before.delta_text + completion.delta_text
            completion.delta_token_ids = before.delta_token_ids + completion.delta_token_ids
    return later


class LoopWaker:
    """Wakes the async consumers of one event loop: one scheduled callback for any number of streams
    filled (from other threads) since the loop last ran it."""

    _wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWaker]" = weakref.WeakKeyDictionary()
    _registry_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[RequestStream] = []
        self._scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "LoopWaker":
        """The waker of ``loop`` (one per loop)."""
        with cls._registry_lock:
            waker = cls._wakers.get(loop)
            if waker is None:
                waker = cls._wakers[loop] = cls(loop)
            return waker

    def wake(self, stream: "RequestStream") -> None:
        """Have ``stream``'s consumer woken on the loop (any thread)."""
        with self._lock:
            self._pending.append(stream)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the consumer's event loop is closed: nobody reads any more
            pass

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for stream in pending:
            stream._wake()


class RequestStream:
    """Filled by the engine loop thread (or a front end's receiver); read by one consumer, from a
    thread or an event loop."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_text: str | None = None  # filled into outputs (the engine only sees token ids)
        self.abort_requested = False
        self.ended = False
        self._lock = threading.Lock()
        self._sync: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: deque = deque()
        self._waker: LoopWaker | None = None
        self._wake_pending = False
        self._waiter: asyncio.Future | None = None
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
        """Queue ``item`` for the consumer (the caller holds ``_lock``)."""
        if self._waker is None:
            self._sync.put(item)
            return
        self._buffer.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self._waker.wake(self)

    def _wake(self) -> None:
        """On the consumer's loop: resume the consumer if it waits."""
        with self._lock:
            self._wake_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
                self._waker = LoopWaker.of(self._loop)
                while not self._sync.empty():
                    self._buffer.append(self._sync.get())

    async def _next_item(self) -> object:
        """The next queued item, waiting on the loop for one; outputs queued behind it merged into it."""
        buffer = self._buffer
        while not buffer:
            self._waiter = self._loop.create_future()  # type: ignore[union-attr]
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = buffer.popleft()
        while isinstance(item, RequestOutput) and buffer and isinstance(buffer[0], RequestOutput):
            item = coalesce(item, buffer.popleft())
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:  # type: ignore[override]
        self._bind_loop()
        while True:
            item = await self._next_item()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
