"""Token mode of the output processor, for an engine whose front end detokenizes (the engine process
behind `sagellm serve`): tokens, logprobs, finish reasons and times are recorded as usual, but no
text is made and no stop string is searched here (the front end does both, and stops a request that
hit a stop string through the engine), and each output carries only what is new since the previous
one, so an output costs the same at the thousandth token as at the first."""

from __future__ import annotations

from typing import Any

from sagellm_core.outputs import CompletionOutput, RequestOutput, TokenLogprob
from sagellm_core.request_state import CompletionState, RequestGroup
from sagellm_core.engine.output import OutputProcessor
from sagellm_core.schedulers.base import TokenUpdate


class TokenOutputProcessor(OutputProcessor):
    """`OutputProcessor` whose outputs are deltas: ``delta_token_ids`` and the new ``logprobs`` entries
    (token strings left empty), ``text`` and ``token_ids`` empty, ``metrics`` only once finished."""

    def _accept(self, group: RequestGroup, state: CompletionState, update: TokenUpdate, logprob: Any,
                now: float) -> None:
        self.num_tokens += 1
        state.token_times.append(now)
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        group.metrics.last_token_time = now
        self.changed[group.request_id] = group
        if state.request.is_finished:
            self._ended(group, state)
        if state.logprobs is not None and logprob is not None:
            chosen, top = logprob
            state.logprobs.append(TokenLogprob(update.token_id, "", chosen, [(tid, "", lp) for tid, lp in top]))

    def take_outputs(self) -> list[RequestOutput]:
        changed, self.changed = self.changed, {}
        outputs = []
        for request_id, group in changed.items():
            finished = group.finished
            if not (group.stream or finished):
                continue
            outputs.append(RequestOutput(request_id, None, [], [_delta(i, s) for i, s in enumerate(group.completions)],
                                         finished, group.metrics if finished else None, error=group.error))
            if finished:
                self.groups.pop(request_id, None)
                for state in group.completions:
                    self.states.pop(state.request.request_id, None)
        return outputs


def _delta(index: int, state: CompletionState) -> CompletionOutput:
    tokens = state.request.known_output_ids
    start, state.emitted_tokens = state.emitted_tokens, len(tokens)
    logprobs = state.logprobs[start:] if state.logprobs is not None else None
    return CompletionOutput(index, delta_token_ids=tokens[start:], finish_reason=state.finish_reason,
                            stop_reason=state.stop_reason, logprobs=logprobs)
