"""Server-sent events: ``data: {json}\\n\\n`` chunks ending with ``data: [DONE]``.

An engine error after the stream started (the engine died, the server shuts down) becomes one
``data: {"error": {...}}`` event before ``[DONE]``: the HTTP status is already sent by then.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from fastapi.responses import StreamingResponse

from sagellm_core.errors import SageLLMError
from sagellm_core.outputs import RequestOutput
from sagellm_core.server.errors import from_engine_error
from sagellm_core.server.jobs import Job, merge
from sagellm_core.server.responses import ChoiceCursor, Formatter, compact_json

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying ``payload`` as compact JSON."""
    return f"data: {compact_json(payload)}\n\n"


async def sse_events(job: Job, iterators: list[AsyncIterator[RequestOutput]], formatter: Formatter,
                     include_usage: bool, max_model_len: int) -> AsyncIterator[str]:
    """The event stream of one job; closes the job (aborting what is unfinished) however it ends."""
    cursors: dict[int, ChoiceCursor] = {}
    try:
        async for prompt_index, output in merge(iterators):
            choices = formatter.delta_choices(prompt_index, output, cursors)
            if choices:
                yield formatter.chunk_event(choices, include_usage)
        if include_usage:
            yield sse(formatter.usage_chunk(job.finals()))
    except SageLLMError as exc:
        yield sse(from_engine_error(exc, max_model_len).body())
    finally:
        job.close()
    yield DONE


def streaming_response(job: Job, iterators: list[AsyncIterator[RequestOutput]], formatter: Formatter,
                       include_usage: bool, max_model_len: int) -> StreamingResponse:
    """The ``text/event-stream`` response of a job whose first outputs already arrived."""
    events = sse_events(job, iterators, formatter, include_usage, max_model_len)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
