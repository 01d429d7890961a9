"""From sampled tokens to `RequestOutput`s: token times, logprobs, incremental text, stop strings,
and the end of each request (metrics, outputs). A failure while processing one request fails that
request alone (finish reason ``"error"``); the others go on."""

from __future__ import annotations

import logging
from typing import Any, Callable

from sagellm_core.detokenizer import TokenTexts
from sagellm_core.outputs import RequestOutput, TokenLogprobs
from sagellm_core.request import RequestStatus
from sagellm_core.request_state import (
    CompletionState,
    RequestGroup,
    find_stop_string,
    record_finish,
)
from sagellm_core.sampling.logprobs import Logprobs
from sagellm_core.schedulers.base import Scheduler, TokenUpdate

log = logging.getLogger("sagellm")
Finished = Callable[[RequestGroup, CompletionState], None]


class OutputProcessor:
    """Owns the user-facing state of every request: groups of ``n`` completions, their text, and
    which groups changed since the outputs were last taken."""

    def __init__(self, tokenizer: Any, scheduler: Scheduler, on_finished: Finished) -> None:
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.scheduler = scheduler
        self.on_finished = on_finished
        self.groups: dict[str, RequestGroup] = {}
        self.states: dict[str, tuple[RequestGroup, CompletionState]] = {}
        self.changed: dict[str, RequestGroup] = {}
        self.num_tokens = 0  # tokens accepted, ever

    def add(self, group: RequestGroup) -> None:
        """Track a new request; its completions get their logprobs container if it asked for logprobs."""
        self.groups[group.request_id] = group
        for state in group.completions:
            self.states[state.request.request_id] = (group, state)
            if group.params.logprobs is not None:
                state.logprobs = TokenLogprobs(self.token_texts)

    def group_of(self, request_id: str) -> RequestGroup | None:
        entry = self.states.get(request_id)
        return entry[0] if entry is not None else None

    # ---- ending requests -----------------------------------------------------------------------
    def end(self, group: RequestGroup, state: CompletionState, status: RequestStatus,
            stop_reason: str | int | None = None) -> None:
        """End one completion now (abort, stop string, error) unless it has ended already."""
        if state.finish_reason is None:
            self.scheduler.finish(state.request, status, stop_reason)
        self._ended(group, state)

    def fail(self, group: RequestGroup, state: CompletionState, error: BaseException) -> None:
        log.exception("request %s failed inside a step", state.request.request_id, exc_info=error)
        group.error = f"{type(error).__name__}: {error}"
        if state.finish_reason is None:
            self.scheduler.finish(state.request, RequestStatus.FINISHED_ERROR)
            self._ended(group, state)
        else:  # it had ended with this token: the error is what the caller must see
            state.finish_reason = RequestStatus.FINISHED_ERROR.value
            self.changed[group.request_id] = group

    def _ended(self, group: RequestGroup, state: CompletionState) -> None:
        if record_finish(state):
            self.on_finished(group, state)
        self.changed[group.request_id] = group

    # ---- tokens --------------------------------------------------------------------------------
    def process(self, updates: list[TokenUpdate], logprobs: dict[str, Logprobs | None], now: float) -> None:
        """Record each accepted token in its request's output state."""
        for update in updates:
            entry = self.states.get(update.request.request_id)
            if entry is None:
                continue
            group, state = entry
            try:
                self._accept(group, state, update, logprobs.get(update.request.request_id), now)
            except Exception as exc:
                self.fail(group, state, exc)

    def _record(self, group: RequestGroup, state: CompletionState, update: TokenUpdate, logprob: Logprobs | None,
                now: float) -> None:
        """A token arrived: its time and logprobs, the group's first/last token times, and the end of a
        finished sequence."""
        self.num_tokens += 1
        if state.logprobs is not None and logprob is not None:
            state.logprobs.append(update.token_id, *logprob)
        state.token_times.append(now)
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        group.metrics.last_token_time = now
        self.changed[group.request_id] = group
        if state.request.is_finished:
            self._ended(group, state)

    def _accept(self, group: RequestGroup, state: CompletionState, update: TokenUpdate, logprob: Logprobs | None,
                now: float) -> None:
        self._record(group, state, update, logprob, now)
        params = group.params
        if not group.stream and not params.stop:  # nobody reads the text before the end
            if state.finish_reason is not None:
                shown = state.request.known_output_ids
                state.text = state.detokenizer.decode_all(shown if update.visible else shown[:-1])
            return
        if not update.visible:
            return
        previous = len(state.text)
        state.text += state.detokenizer.add(update.token_id)
        if state.finish_reason is not None:
            state.text += state.detokenizer.flush()
        hit = find_stop_string(state.text, previous, params.stop) if update.may_stop and params.stop else None
        if hit is not None:
            state.text = state.text[: hit[0]]
            if state.finish_reason is None:
                self.end(group, state, RequestStatus.FINISHED_STOPPED, hit[1])
            else:  # it ended on its length with this very token: the stop string is the reason
                state.finish_reason, state.stop_reason = RequestStatus.FINISHED_STOPPED.value, hit[1]

    # ---- outputs -------------------------------------------------------------------------------
    def take_outputs(self) -> list[RequestOutput]:
        """Outputs of the groups that changed (streamed ones, and finished ones); forgets finished groups."""
        changed, self.changed = self.changed, {}
        outputs = []
        for request_id, group in changed.items():
            if not (group.stream or group.finished):
                continue
            outputs.append(group.output())
            if group.finished:
                self.groups.pop(request_id, None)
                for state in group.completions:
                    self.states.pop(state.request.request_id, None)
        return outputs
