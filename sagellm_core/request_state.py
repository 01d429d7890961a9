"""Per-request output state kept by the engine: text, stop-string handling, streaming deltas."""

from __future__ import annotations

import attrs

from sagellm_core.detokenizer import IncrementalDetokenizer
from sagellm_core.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from sagellm_core.request import Request
from sagellm_core.sampling_params import SamplingParams


@attrs.define
class CompletionState:
    """Text state of one sequence (one of ``n``)."""

    request: Request
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    token_times: list[float] = attrs.field(factory=list)
    logprobs: TokenLogprobs | None = None  # when the request asked for logprobs
    stop_reason: str | int | None = None
    finish_reason: str | None = None

    def hold_back(self, params: SamplingParams) -> int:
        """Characters not streamed yet because they might start a stop string."""
        if self.finish_reason is not None or not params.stop:
            return 0
        return max(len(s) for s in params.stop) - 1


@attrs.define
class RequestGroup:
    """A user request: ``n`` sequences sharing one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[CompletionState]
    metrics: RequestMetrics
    stream: bool = True
    error: str | None = None

    @property
    def finished(self) -> bool:
        for completion in self.completions:  # a loop, not all(<generator>): this runs per token
            if completion.finish_reason is None:
                return False
        return True

    def output(self) -> RequestOutput:
        """Cumulative state plus the deltas since the previous call."""
        outputs = []
        for index, state in enumerate(self.completions):
            visible_len = len(state.text) - state.hold_back(self.params)
            delta_text = state.text[state.emitted_chars:visible_len] if visible_len > state.emitted_chars else ""
            state.emitted_chars = max(state.emitted_chars, visible_len)
            tokens = state.request.known_output_ids  # a fresh list: the output's own
            delta_tokens = tokens[state.emitted_tokens:]
            state.emitted_tokens = len(tokens)
            outputs.append(CompletionOutput(
                index=index,
                text=state.text[: state.emitted_chars] if state.finish_reason is None else state.text,
                token_ids=tokens,
                delta_text=delta_text,
                delta_token_ids=delta_tokens,
                finish_reason=state.finish_reason,
                stop_reason=state.stop_reason,
                logprobs=state.logprobs.snapshot() if state.logprobs is not None else None,
            ))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished,
                             self.metrics, error=self.error)


def record_finish(state: CompletionState) -> bool:
    """Copy the finished request's reason into its text state; False if it was recorded before."""
    if state.finish_reason is not None:
        return False
    state.finish_reason = state.request.status.value
    state.stop_reason = state.request.stop_reason
    return True


def find_stop_string(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends in the new part of ``text``; returns (start index, string)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, new_from - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best

