"""Per-request timing records and their summaries (mean / median / p99)."""

from __future__ import annotations

import math
from typing import Any, Iterable

import attrs


@attrs.frozen
class RequestTiming:
    """One finished request, times in seconds on one clock (``time.monotonic`` or ``perf_counter``)."""

    arrival: float
    first_token: float | None
    finished: float
    prompt_len: int
    output_len: int
    token_times: tuple[float, ...] = ()
    cached_tokens: int = 0
    ok: bool = True

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.output_len < 2:
            return None
        return (self.finished - self.first_token) / (self.output_len - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def percentile(values: list[float], point: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * point / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Iterable[float | None], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, p99 (and count) of the non-None values, multiplied by ``scale`` (s -> ms)."""
    kept = [v * scale for v in values if v is not None]
    if not kept:
        return {"count": 0}
    return {"count": len(kept), "mean": sum(kept) / len(kept), "median": percentile(kept, 50.0),
            "p99": percentile(kept, 99.0)}


def latency_summary(timings: list[RequestTiming]) -> dict[str, Any]:
    """TTFT / TPOT / ITL / E2E summaries in milliseconds."""
    ok = [t for t in timings if t.ok]
    return {
        "ttft_ms": summarize(t.ttft for t in ok),
        "tpot_ms": summarize(t.tpot for t in ok),
        "itl_ms": summarize(itl for t in ok for itl in t.itls),
        "e2e_ms": summarize(t.e2e for t in ok),
    }


def throughput_summary(timings: list[RequestTiming], elapsed: float) -> dict[str, float]:
    """Requests/s, output tokens/s and total tokens/s over ``elapsed`` seconds."""
    ok = [t for t in timings if t.ok]
    output = sum(t.output_len for t in ok)
    prompt = sum(t.prompt_len for t in ok)
    return {
        "elapsed_s": elapsed, "completed": len(ok), "failed": len(timings) - len(ok),
        "prompt_tokens": prompt, "output_tokens": output,
        "requests_per_s": len(ok) / elapsed if elapsed else 0.0,
        "output_tokens_per_s": output / elapsed if elapsed else 0.0,
        "total_tokens_per_s": (prompt + output) / elapsed if elapsed else 0.0,
    }
