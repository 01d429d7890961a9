"""One API request's engine requests: submit, await or iterate, and abort whatever is left.

NOTE: every path out of a job (normal end, engine error, client gone, task cancelled) ends in
`Job.close`, which aborts the engine requests that have not finished, so their KV blocks are freed.
A disconnect watcher polls the connection while the job runs, so a client that goes away while its
request is queued or generating is aborted even when no chunk is being written; once a streaming
response starts and listens for the disconnect itself (Starlette under ASGI < 2.4), the polling stops.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, MutableMapping

from starlette.requests import Request

from sagellm_core.inputs import ProcessedPrompt
from sagellm_core.outputs import RequestOutput
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.streams import RequestStream

if TYPE_CHECKING:
    from sagellm_core.server.app import Engine

DISCONNECT_POLL_S = 0.25


def response_listens_for_disconnect(scope: MutableMapping[str, Any]) -> bool:
    """Whether a Starlette `StreamingResponse` awaits ``http.disconnect`` while it streams (ASGI spec
    versions before 2.4; from 2.4 on it learns of a disconnect only when a send fails)."""
    version = str(scope.get("asgi", {}).get("spec_version", "2.0"))
    return tuple(int(part) for part in version.split(".")[:2]) < (2, 4)


class Job:
    """The engine requests behind one API call (one per prompt; each may have ``n`` sequences)."""

    def __init__(self, llm: Engine, job_id: str, prompts: list[ProcessedPrompt], params: SamplingParams) -> None:
        self.llm = llm
        self.job_id = job_id
        self.streams: list[RequestStream] = []
        self._watcher: asyncio.Task | None = None
        try:
            for index, prompt in enumerate(prompts):
                request_id = job_id if len(prompts) == 1 else f"{job_id}-{index}"
                self.streams.append(llm.submit(prompt, params, request_id=request_id))
        except BaseException:
            self.close()
            raise

    @property
    def done(self) -> bool:
        return all(stream.final is not None for stream in self.streams)

    def finals(self) -> list[RequestOutput]:
        """Final outputs in prompt order (only valid once `done`)."""
        return [stream.final for stream in self.streams]  # type: ignore[misc]

    def watch(self, request: Request) -> None:
        """Abort this job if ``request``'s client disconnects before it is done."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while not self.done:
            if await request.is_disconnected():
                self.abort()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    def stop_watching(self) -> None:
        """Stop polling the connection: the response now listens for the disconnect itself."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def abort(self) -> None:
        """Abort the engine requests that have not finished (a no-op for finished ones)."""
        for stream in self.streams:
            if stream.final is None:
                self.llm.abort(stream.request_id)

    def close(self) -> None:
        """Stop watching and abort what is unfinished; safe to call more than once."""
        self.stop_watching()
        self.abort()

    async def collect(self) -> list[RequestOutput]:
        """Await every request's final output; raises the first engine error (after aborting the rest)."""
        try:
            return list(await asyncio.gather(*(_last(stream) for stream in self.streams)))
        finally:
            self.close()

    async def open(self) -> list[AsyncIterator[RequestOutput]]:
        """Iterators over each request's outputs, after their first output arrived.

        Waiting for the first output surfaces admission errors (bad prompt, overload) before any
        streaming response starts, so they get a proper HTTP status.
        """
        try:
            iterators = []
            for stream in self.streams:
                iterator = stream.__aiter__()
                first = await iterator.__anext__()
                iterators.append(_prepend(first, iterator))
            return iterators
        except BaseException:
            self.close()
            raise


async def _last(stream: RequestStream) -> RequestOutput:
    final = None
    async for output in stream:
        final = output
    assert final is not None, "a request stream ended without an output"
    return final


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for item in rest:
        yield item


async def merge(iterators: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Items of several iterators as they arrive, tagged with the iterator's index."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(iterators[index].__anext__())] = index
                yield index, item
    finally:
        for future in pending:
            future.cancel()
