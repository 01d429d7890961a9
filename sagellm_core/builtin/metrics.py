"""Built-in metric sinks: latency (TTFT/TPOT/ITL/E2E), throughput, KV-cache statistics."""

from __future__ import annotations

from typing import Any

from sagellm_core.hookspecs import hookimpl
from sagellm_core.metrics.base import RequestEvent, StepEvent
from sagellm_core.metrics.latency import percentiles
from sagellm_core.metrics.prometheus import PrometheusSink


class LatencySink:
    """Per-request latencies with mean and percentiles (seconds)."""

    def __init__(self, config: Any = None) -> None:
        self.points = list(getattr(config, "percentiles", [50.0, 90.0, 99.0]))
        self.ttft: list[float] = []
        self.tpot: list[float] = []
        self.itl: list[float] = []
        self.e2e: list[float] = []

    def on_step(self, event: StepEvent) -> None:
        pass

    def on_request_finished(self, event: RequestEvent) -> None:
        if event.ttft is not None:
            self.ttft.append(event.ttft)
        if event.tpot is not None:
            self.tpot.append(event.tpot)
        self.itl.extend(event.itls)
        self.e2e.append(event.e2e)

    def snapshot(self) -> dict[str, Any]:
        return {name: percentiles(getattr(self, name), self.points) for name in ("ttft", "tpot", "itl", "e2e")}


class ThroughputSink:
    """Tokens and requests per second over the busy span (first step start to last step end)."""

    def __init__(self, config: Any = None) -> None:
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
        span = (self.last_end - self.first_start) if self.first_start is not None else 0.0
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

    def __init__(self, config: Any = None) -> None:
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
def sagellm_register_metrics(register: Any) -> None:
    register("latency", LatencySink)
    register("throughput", ThroughputSink)
    register("kv", KVSink)
    register("prometheus", PrometheusSink)
