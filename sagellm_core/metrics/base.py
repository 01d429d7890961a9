"""Events the engine emits (once per step, once per finished request) and the sink contract."""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from sagellm_core.kv.manager import KVStats
from sagellm_core.kv.tiers.base import TierStats
from sagellm_core.metrics import latency
from sagellm_core.metrics.latency import percentiles

__all__ = ["MetricSink", "RequestEvent", "StepEvent", "percentiles"]  # percentiles: kept importable from here


@attrs.frozen
class StepEvent:
    """One engine step. ``num_output_tokens`` counts the tokens that reached their requests during
    the step (with async scheduling: those the previous step sampled; a token computed for a request
    that had already ended is not counted)."""

    step: int
    start_time: float
    end_time: float
    num_seqs: int
    num_decode_tokens: int
    num_prefill_tokens: int
    num_output_tokens: int
    num_waiting: int
    num_running: int
    num_preempted: int
    kv: tuple[KVStats, ...]
    kv_tiers: tuple[TierStats, ...] = ()
    """The tiers under the first KV pool (`sagellm_core.kv.tiers`), top first."""

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time


@attrs.frozen
class RequestEvent:
    request_id: str
    arrival_time: float
    first_token_time: float | None
    finished_time: float
    token_times: tuple[float, ...]
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    finish_reason: str

    # The definitions live in `sagellm_core.metrics.latency` (shared with the benchmark harness).
    @property
    def ttft(self) -> float | None:
        return latency.ttft(self.arrival_time, self.first_token_time)

    @property
    def e2e(self) -> float:
        return latency.e2e(self.arrival_time, self.finished_time)

    @property
    def tpot(self) -> float | None:
        return latency.tpot(self.first_token_time, self.finished_time, self.num_output_tokens)

    @property
    def itls(self) -> list[float]:
        return latency.itls(self.token_times)


class MetricSink(Protocol):
    """What a metric plugin's factory returns."""

    def on_step(self, event: StepEvent) -> None: ...

    def on_request_finished(self, event: RequestEvent) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...
