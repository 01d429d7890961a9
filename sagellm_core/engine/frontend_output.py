"""The front end's half of output processing when the engine runs in its own process: from the
engine's per-step deltas (new token ids, logprobs, finish reasons) to the `RequestOutput`s callers
read: incremental text, stop strings, logprob token strings, cumulative token ids.

Stop strings are found here, on the text; the sequence ends here at once (its text cut where the
stop string starts) and the engine is told to stop generating it (`Kind.STOP`): tokens it computed
meanwhile are dropped. Which tokens are text follows the scheduler's rule: a token that ended its
sequence as EOS or a stop token id is not shown.
"""

from __future__ import annotations

import time
from typing import Any

from sagellm_core.detokenizer import IncrementalDetokenizer, TokenTexts
from sagellm_core.engine.token_output import SequenceDelta, TokenDelta
from sagellm_core.outputs import RequestMetrics, RequestOutput, TokenLogprobs
from sagellm_core.request import Request
from sagellm_core.request_state import CompletionState, RequestGroup, find_stop_string
from sagellm_core.sampling_params import SamplingParams


class FrontendOutputs:
    """Text state of the requests one front end has in the engine."""

    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.groups: dict[str, RequestGroup] = {}

    def add(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
            stream: bool) -> None:
        """Track a request about to be sent to the engine (ids of its ``n`` sequences as the engine's)."""
        completions = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(child_id, token_ids, params, 0, eos_token_ids=self.eos_token_ids, index=index)
            detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            logprobs = TokenLogprobs(self.token_texts) if params.logprobs is not None else None
            completions.append(CompletionState(request, detokenizer, logprobs=logprobs))
        self.groups[request_id] = RequestGroup(request_id, text, token_ids, params, completions,
                                               RequestMetrics(arrival_time=time.monotonic()), stream=stream)

    @staticmethod
    def engine_stream(params: SamplingParams, stream: bool) -> bool:
        """Whether the engine must report a request every step: when its caller streams, and when the
        front end must see its text as it grows (stop strings)."""
        return stream or bool(params.stop)

    def drop(self, request_id: str) -> None:
        self.groups.pop(request_id, None)

    def apply(self, delta: TokenDelta) -> tuple[RequestOutput | None, list[tuple[str, str]]]:
        """The caller's output for one engine delta (None: nothing to report), and the sequences that
        hit a stop string here: (sequence id, stop string) to stop in the engine."""
        request_id, _, error, metrics, sequences = delta
        group = self.groups.get(request_id)
        if group is None:  # ended here already (stop strings)
            return None, []
        stops = []
        for sequence in sequences:
            state = group.completions[sequence[0]]
            if state.finish_reason is None and self._accept(group, state, sequence):
                stops.append((state.request.request_id, str(state.stop_reason)))
        if error is not None:
            group.error = error
        if metrics is not None:
            group.metrics = metrics
        if not (group.stream or group.finished):
            return None, stops
        if group.finished:
            del self.groups[group.request_id]
        return group.output(), stops

    def _accept(self, group: RequestGroup, state: CompletionState, sequence: SequenceDelta) -> bool:
        """Take one sequence's new tokens; True if it hit a stop string here."""
        params, request = group.params, state.request
        _, new, finish_reason, stop_reason, logprobs = sequence
        finishing = finish_reason is not None
        lazy = not group.stream and not params.stop  # nobody reads the text before the end
        for position, token_id in enumerate(new):
            request.output_token_ids.append(token_id)
            if state.logprobs is not None and logprobs is not None and position < len(logprobs[0]):
                ids, chosen, top_ids, top_logprobs = logprobs
                state.logprobs.append(ids[position], chosen[position], top_ids[position], top_logprobs[position])
            if lazy:
                continue
            may_stop = len(request.output_token_ids) >= params.min_tokens
            previous = len(state.text)
            if not self._hidden(params, token_id, may_stop):
                state.text += state.detokenizer.add(token_id)
            if finishing and position == len(new) - 1:
                state.text += state.detokenizer.flush()
            hit = find_stop_string(state.text, previous, params.stop) if may_stop and params.stop else None
            if hit is not None:
                state.text = state.text[: hit[0]]
                state.finish_reason, state.stop_reason = "stop", hit[1]
                return True
        if finishing:
            if lazy:
                shown = request.output_token_ids
                hidden = bool(shown) and self._hidden(params, shown[-1], len(shown) >= params.min_tokens)
                state.text = state.detokenizer.decode_all(shown[:-1] if hidden else shown)
            state.finish_reason, state.stop_reason = finish_reason, stop_reason
        return False

    def _hidden(self, params: SamplingParams, token_id: int, may_stop: bool) -> bool:
        """The scheduler's rule: an EOS (unless ignored) or stop token id that ended the sequence."""
        return may_stop and ((not params.ignore_eos and token_id in self.eos_token_ids)
                             or token_id in params.stop_token_ids)
