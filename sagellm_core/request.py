"""The engine's internal unit of work: one sequence being generated."""

from __future__ import annotations

import enum
import itertools
import time

import attrs

from sagellm_core.plan import PENDING_TOKEN
from sagellm_core.sampling_params import SamplingParams

__all__ = ["PENDING_TOKEN", "Request", "RequestStatus"]

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED)


@attrs.define(eq=False)
class Request:
    """One sequence: its tokens, how many of them have KV computed, and where its KV lives.

    The invariant that drives everything (vLLM v1's idea): ``num_computed_tokens`` catches up with
    ``num_tokens`` one scheduled chunk at a time; prefill, chunked prefill, prefix reuse and decode
    are all just "compute the next n tokens".

    Fields a scheduler plugin reads: ``request_id``, ``prompt_token_ids``, ``output_token_ids``
    (a trailing `PENDING_TOKEN` is a token sampled by a step the host has not read yet),
    ``params`` (`SamplingParams`), ``max_tokens`` (already capped by the context), ``priority``,
    ``arrival_time`` / ``arrival_order``, ``num_computed_tokens`` (tokens whose KV is computed or
    queued), ``num_cached_tokens`` (prefix-cache hits), ``num_preemptions``, ``status``, ``pool``
    (KV pool index). Only the scheduler base class writes ``num_computed_tokens``, ``status`` and
    ``pool``; plugins decide order, admission and victims, not bookkeeping.
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
    stop_reason: str | int | None = None
    bad_token_ids: frozenset[int] = frozenset()  # never sampled (`SamplingParams.bad_words`, resolved)

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

    # ---- placeholders of tokens sampled by steps not read yet (the only code that edits them) -------
    @property
    def has_pending_token(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING_TOKEN

    @property
    def num_placeholders(self) -> int:
        """How many trailing outputs are placeholders (at most two: one step in flight, one planned)."""
        count = 0
        for token in reversed(self.output_token_ids):
            if token != PENDING_TOKEN:
                break
            count += 1
        return count

    def add_pending_token(self) -> None:
        """A step that samples this request was planned: hold a place for its token."""
        self.output_token_ids.append(PENDING_TOKEN)

    def resolve_pending_token(self, token_id: int) -> int:
        """Put a sampled token in place of the oldest placeholder (or append it when there is none);
        returns how many output tokens the request has up to and including it."""
        index = len(self.output_token_ids) - self.num_placeholders
        if index == len(self.output_token_ids):
            self.output_token_ids.append(token_id)
        else:
            self.output_token_ids[index] = token_id
        return index + 1

    def drop_pending_tokens(self) -> None:
        """Forget the placeholders of tokens that will not be accepted (the request ended)."""
        del self.output_token_ids[len(self.output_token_ids) - self.num_placeholders:]

    drop_pending_token = drop_pending_tokens

    @property
    def known_output_ids(self) -> list[int]:
        """The output tokens read so far (without the placeholders)."""
        return self.output_token_ids[: len(self.output_token_ids) - self.num_placeholders]

    @property
    def num_prior_outputs(self) -> int:
        """Output tokens before the one being sampled now (whose placeholder, if any, is the newest)."""
        return self.num_output_tokens - (1 if self.has_pending_token else 0)

    @property
    def prior_output_ids(self) -> list[int]:
        """The outputs before the token being sampled (read only by steps that run synchronously)."""
        return self.output_token_ids[:-1] if self.has_pending_token else self.output_token_ids

    @property
    def reached_length(self) -> bool:
        """Every token it may generate is sampled or planned: it will finish, do not schedule it."""
        return self.num_output_tokens >= self.max_tokens

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
