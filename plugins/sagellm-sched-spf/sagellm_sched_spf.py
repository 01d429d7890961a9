"""Shortest-prompt-first scheduling with aging: a complete sageLLM scheduler plugin in one module.

Waiting requests are admitted in order of

    key = prompt length - aging_tokens_per_second * seconds waited

so short prompts go first (lower time-to-first-token on mixed workloads), and a long prompt gains
``aging_tokens_per_second`` tokens of precedence per second it waits, so it is never starved.

Enable it with ``scheduler: {name: spf, options: {aging_tokens_per_second: 100}}``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import attrs

from sagellm_core.config import FieldError, SchedulerConfig
from sagellm_core.hookspecs import hookimpl
from sagellm_core.schedulers.base import PolicyScheduler

SAGELLM_PLUGIN_API = ">=1.0,<2"
"""The sageLLM plugin-API versions this module works with; a core outside the range refuses it."""

SCHEDULER_NAME = "spf"


class WaitingRequest(Protocol):
    """The request attributes the ordering reads (the engine's `Request` has them)."""

    request_id: Any
    prompt_token_ids: Sequence[int]
    arrival_time: float


def _finite_non_negative(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise FieldError(attribute.name, f"must be a finite number >= 0, got {value}")


@attrs.frozen
class SPFOptions:
    """``scheduler.options`` of the ``spf`` scheduler (validated by the core; errors name the field).

    ``aging_tokens_per_second``: how many prompt tokens of precedence a request gains per second of
    waiting. 0 is pure shortest-prompt-first (long prompts can starve under steady load).
    """

    aging_tokens_per_second: float = attrs.field(default=100.0, validator=_finite_non_negative)


def spf_key(request: WaitingRequest, now: float, aging: float) -> tuple[float, float, str]:
    """Sort key of ``request`` at time ``now`` (smallest runs first).

    Prompt length minus ``aging`` times the seconds waited; ties go to the earlier arrival, then the
    smaller request id, so the order is total and deterministic.
    """
    waited = now - request.arrival_time
    return (len(request.prompt_token_ids) - aging * waited, request.arrival_time, str(request.request_id))


class SPFScheduler(PolicyScheduler):
    """`PolicyScheduler` (budgets, chunked prefill, preemption) with the SPF admission order.

    The preemption victim is the request with the largest key: the longest, least-aged prompt.
    """

    def __init__(self, config: SchedulerConfig, options: SPFOptions | None = None) -> None:
        super().__init__(config, options if options is not None else SPFOptions())
        self.aging = self.options.aging_tokens_per_second

    def waiting_key(self, request: Any) -> tuple[float, float, str]:
        # NOTE: at any instant every key contains the same ``aging * now`` term, so the order never
        # depends on ``now``. A fixed reference (0) keeps each request's key constant across sorts
        # and steps and independent of which clock stamped ``arrival_time``.
        return spf_key(request, now=0.0, aging=self.aging)


@hookimpl
def sagellm_register_schedulers(register: Any) -> None:
    """Register the ``spf`` scheduler and its options class."""
    register(SCHEDULER_NAME, SPFScheduler, options=SPFOptions)
