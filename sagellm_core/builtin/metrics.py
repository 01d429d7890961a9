"""Built-in metric sinks: latency (TTFT/TPOT/ITL/E2E), throughput, KV-cache statistics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import attrs
import numpy as np

from sagellm_core.hookspecs import Register, hookimpl
from sagellm_core.metrics.base import RequestEvent, StepEvent
from sagellm_core.metrics.latency import percentiles
from sagellm_core.metrics.prometheus import PrometheusSink
from sagellm_core.options import at_least

if TYPE_CHECKING:
    from sagellm_core.config import MetricsConfig


@attrs.frozen
class LatencyOptions:
    """``metrics.options.latency``: ``window`` = how many recent samples each series keeps (TTFT,
    TPOT and E2E: one per finished request; ITL: one per gap between two output tokens)."""

    window: int = attrs.field(default=100_000, validator=at_least(1))


class RecentValues:
    """The last ``capacity`` values of a series in a fixed float64 ring (bounded memory)."""

    def __init__(self, capacity: int) -> None:
        self.ring = np.zeros(capacity, dtype=np.float64)
        self.count = 0  # values ever added

    def add(self, value: float) -> None:
        self.ring[self.count % len(self.ring)] = value
        self.count += 1

    def extend(self, values: Sequence[float]) -> None:
        for value in values[-len(self.ring):]:
            self.add(value)

    def values(self) -> np.ndarray:
        return self.ring[: min(self.count, len(self.ring))]


class LatencySink:
    """TTFT, TPOT, ITL and E2E (seconds): mean and percentiles over each series' most recent
    ``window`` samples (linear interpolation between ranks), plus ``count``, the samples kept."""

    SERIES = ("ttft", "tpot", "itl", "e2e")

    def __init__(self, config: MetricsConfig | None = None, options: LatencyOptions | None = None) -> None:
        self.points = list(config.percentiles if config is not None else [50.0, 90.0, 99.0])
        window = (options or LatencyOptions()).window
        self.series = {name: RecentValues(window) for name in self.SERIES}

    def on_step(self, event: StepEvent) -> None:
        pass

    def on_request_finished(self, event: RequestEvent) -> None:
        if event.ttft is not None:
            self.series["ttft"].add(event.ttft)
        if event.tpot is not None:
            self.series["tpot"].add(event.tpot)
        self.series["itl"].extend(event.itls)
        self.series["e2e"].add(event.e2e)

    def snapshot(self) -> dict[str, Any]:
        return {name: self._summary(self.series[name].values()) for name in self.SERIES}

    def _summary(self, values: np.ndarray) -> dict[str, float]:
        out = percentiles(values, self.points)
        if out:
            out["count"] = float(values.size)
        return out


class ThroughputSink:
    """Tokens and requests per second over the busy span (first step start to last step end)."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.busy_time = 0.0
        self.steps = 0
        self.prompt_tokens = 0
        self.output_tokens = 0
        self.requests = 0

    def on_step(self, event: StepEvent) -> None:
        self.first_start = event.start_time if self.first_start is None else self.first_start
        self.last_end = event.end_time
        self.busy_time += event.duration
        self.steps += 1
        self.output_tokens += event.num_output_tokens

    def on_request_finished(self, event: RequestEvent) -> None:
        self.requests += 1
        self.prompt_tokens += event.num_prompt_tokens

    def snapshot(self) -> dict[str, Any]:
        span = self.last_end - self.first_start if self.first_start is not None and self.last_end is not None else 0.0
        return {
            "steps": self.steps,
            "finished_requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "span_s": span,
            "busy_s": self.busy_time,
            "output_tokens_per_s": self.output_tokens / span if span > 0 else 0.0,
            "requests_per_s": self.requests / span if span > 0 else 0.0,
        }


class KVSink:
    """Latest and peak KV-pool usage, and the prefix-cache hit rate."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.latest: dict[str, Any] = {}
        self.peak_usage = 0.0
        self.preemptions = 0

    def on_step(self, event: StepEvent) -> None:
        pools = [
            {"num_blocks": s.num_blocks, "used_blocks": s.used_blocks, "free_blocks": s.free_blocks,
             "cached_blocks": s.cached_blocks, "usage": s.usage, "hit_rate": s.hit_rate,
             "prefix_hit_tokens": s.prefix_hit_tokens, "prefix_query_tokens": s.prefix_query_tokens}
            for s in event.kv
        ]
        self.peak_usage = max([self.peak_usage] + [p["usage"] for p in pools])
        self.preemptions += event.num_preempted
        self.latest = {"pools": pools}

    def on_request_finished(self, event: RequestEvent) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {**self.latest, "peak_usage": self.peak_usage, "preemptions": self.preemptions}


@hookimpl
def sagellm_register_metrics(register: Register) -> None:
    """Register ``latency`` (options: `LatencyOptions`), ``throughput``, ``kv`` and ``prometheus``."""
    register("latency", LatencySink, options=LatencyOptions)
    register("throughput", ThroughputSink)
    register("kv", KVSink)
    register("prometheus", PrometheusSink)
