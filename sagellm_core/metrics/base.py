"""Events the engine emits (once per step, once per finished request) and the sink contract."""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from sagellm_core.kv.manager import KVStats


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

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        if self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]


class MetricSink(Protocol):
    """What a metric plugin's factory returns."""

    def on_step(self, event: StepEvent) -> None: ...

    def on_request_finished(self, event: RequestEvent) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


def percentiles(values: list[float], points: list[float]) -> dict[str, float]:
    """mean plus the requested percentiles (nearest-rank on the sorted values); empty -> {}."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {"mean": sum(ordered) / len(ordered)}
    for point in points:
        rank = min(len(ordered) - 1, max(0, round(point / 100.0 * (len(ordered) - 1))))
        out[f"p{point:g}"] = ordered[rank]
    return out
