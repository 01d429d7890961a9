"""What callers receive: per-request outputs, incremental while streaming."""

from __future__ import annotations

import attrs


@attrs.define
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = attrs.field(factory=list)


@attrs.define
class CompletionOutput:
    """One of the ``n`` completions of a request. ``text``/``token_ids`` are cumulative; ``delta_*`` new."""

    index: int
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = attrs.field(factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@attrs.define
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@attrs.define
class RequestOutput:
    """State of a request after a step (or at the end). ``finished`` once every completion finished.

    ``error``: set when processing this request failed inside a step (its finish reason is then
    ``"error"``); the other requests of the step went on."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
