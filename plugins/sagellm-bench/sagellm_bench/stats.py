"""Per-request timing records and their summaries (mean / median / p99), on the engine's latency definitions."""

from __future__ import annotations

from typing import Any, Iterable

import attrs

from sagellm_core.metrics import latency


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

    # The definitions are the engine's own (`sagellm_core.metrics.latency`), so `get_stats()` agrees.
    @property
    def ttft(self) -> float | None:
        return latency.ttft(self.arrival, self.first_token)

    @property
    def e2e(self) -> float:
        return latency.e2e(self.arrival, self.finished)

    @property
    def tpot(self) -> float | None:
        return latency.tpot(self.first_token, self.finished, self.output_len)

    @property
    def itls(self) -> list[float]:
        return latency.itls(self.token_times)


def summarize(values: Iterable[float | None], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, p99 (and count) of the non-None values, then multiplied by ``scale`` (s -> ms).

    The figures are `sagellm_core.metrics.latency.percentiles` of the unscaled values, so a p99 here is
    exactly ``scale`` times the p99 the engine's latency sink reports for the same timestamps.
    """
    kept = [v for v in values if v is not None]
    if not kept:
        return {"count": 0}
    stats = latency.percentiles(kept, (50.0, 99.0))
    return {"count": len(kept), "mean": stats["mean"] * scale, "median": stats["p50"] * scale,
            "p99": stats["p99"] * scale}


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
