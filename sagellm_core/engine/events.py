"""Metric events: a `StepEvent` per step (gauges: queues, KV usage, preemptions) and a
`RequestEvent` per finished request, delivered to the metric sinks. A sink that raises is dropped."""

from __future__ import annotations

import logging
from typing import Any

from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.metrics.base import RequestEvent, StepEvent
from sagellm_core.plan import StepPlan
from sagellm_core.request_state import CompletionState, RequestGroup
from sagellm_core.schedulers.base import Scheduler

log = logging.getLogger("sagellm")
IDLE_EVENT_INTERVAL = 0.1
"""Seconds between step events of steps that ran nothing (gauges stay fresh, sinks not flooded)."""


class EngineEvents:
    """Builds and delivers the engine's metric events."""

    def __init__(self, sinks: dict[str, Any], scheduler: Scheduler, kv_pools: list[KVCacheManager]) -> None:
        self.sinks = sinks
        self.scheduler = scheduler
        self.kv_pools = kv_pools
        self.step_counter = 0
        self.tokens_since_step = 0  # tokens that reached requests since the last StepEvent
        self._last_idle_event = float("-inf")

    def step(self, plan: StepPlan, start: float, end: float, idle: bool = False) -> None:
        """One step's gauges; a step that ran and delivered nothing (``idle``) reports at most once
        per `IDLE_EVENT_INTERVAL`."""
        if idle:
            if end - self._last_idle_event < IDLE_EVENT_INTERVAL:
                return
            self._last_idle_event = end
        self.step_counter += 1
        num_output_tokens, self.tokens_since_step = self.tokens_since_step, 0
        decode_tokens = plan.num_decode_tokens
        event = StepEvent(
            step=self.step_counter, start_time=start, end_time=end, num_seqs=len(plan.chunks),
            num_decode_tokens=decode_tokens, num_prefill_tokens=plan.num_tokens - decode_tokens,
            num_output_tokens=num_output_tokens, num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running), num_preempted=len(plan.preempted),
            kv=tuple(pool.stats() for pool in self.kv_pools),
            kv_tiers=tuple(self.tier_stats()),
        )
        self.notify("on_step", event)

    def tier_stats(self) -> list[Any]:
        tiers = self.kv_pools[0].tiers if self.kv_pools else None
        return tiers.stats() if tiers is not None else []

    def request_finished(self, group: RequestGroup, state: CompletionState, now: float) -> None:
        """One completion ended: fold it into the group's metrics and report it."""
        request = state.request
        if group.finished:
            group.metrics.finished_time = now
        group.metrics.num_cached_tokens = max(group.metrics.num_cached_tokens, request.num_cached_tokens)
        group.metrics.num_preemptions += request.num_preemptions
        event = RequestEvent(
            request_id=request.request_id,
            arrival_time=group.metrics.arrival_time,
            first_token_time=state.token_times[0] if state.token_times else None,
            finished_time=now,
            token_times=tuple(state.token_times),
            num_prompt_tokens=len(group.prompt_token_ids),
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            finish_reason=state.finish_reason or "abort",
        )
        self.notify("on_request_finished", event)

    def notify(self, method: str, event: Any) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                getattr(sink, method)(event)
            except Exception as exc:  # a broken metric plugin is dropped, the engine keeps serving
                log.error("metric sink %r raised %s: %s; disabling it", name, type(exc).__name__, exc)
                del self.sinks[name]
