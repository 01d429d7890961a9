"""The engine's internal unit of work: one sequence being generated."""

from __future__ import annotations

import enum
import itertools
import time

import attrs

from sagellm_core.sampling_params import SamplingParams

_arrival_counter = itertools.count()

PENDING_TOKEN = -1
"""Stands in ``output_token_ids`` for a token sampled by a step still running on the device
(async scheduling): counts are right, the value arrives when the engine reads that step."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@attrs.define(eq=False)
class Request:
    """One sequence: its tokens, how many of them have KV computed, and where its KV lives.

    The invariant that drives everything (vLLM v1's idea): ``num_computed_tokens`` catches up with
    ``num_tokens`` one scheduled chunk at a time; prefill, chunked prefill, prefix reuse and decode
    are all just "compute the next n tokens".
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = attrs.field(factory=time.monotonic)
    arrival_order: int = attrs.field(factory=lambda: next(_arrival_counter))
    output_token_ids: list[int] = attrs.field(factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    pool: int = 0
    parent_id: str | None = None
    index: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the whole list."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    @property
    def has_pending_token(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING_TOKEN

    def drop_pending_token(self) -> None:
        """Forget the placeholder of a token that will not be accepted (the request ended meanwhile)."""
        if self.has_pending_token:
            self.output_token_ids.pop()

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def in_prefill(self) -> bool:
        """True until the KV of every token but the newest sampled one is computed."""
        return self.num_computed_tokens < self.num_tokens - 1 or not self.output_token_ids

    @property
    def num_pending_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
