"""The one definition of request latencies and their percentiles, shared by `LLMEngine.get_stats()`'s
metric sinks and the ``sagellm bench`` harness.

Request-level, from timestamps in seconds on one clock:

- TTFT: first token time - arrival time;
- TPOT: (finish time - first token time) / (output tokens - 1), undefined below two output tokens;
- ITL: the gaps between consecutive token times;
- E2E: finish time - arrival time.

Percentiles interpolate linearly between the two nearest ranks (numpy's default method), so the p99
of 10 values lies between the 9th and the 10th.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def ttft(arrival_time: float, first_token_time: float | None) -> float | None:
    """Time to first token; None when no token was produced."""
    return None if first_token_time is None else first_token_time - arrival_time


def tpot(first_token_time: float | None, finished_time: float, num_output_tokens: int) -> float | None:
    """Mean time per output token after the first; None below two output tokens."""
    if first_token_time is None or num_output_tokens < 2:
        return None
    return (finished_time - first_token_time) / (num_output_tokens - 1)


def itls(token_times: Sequence[float]) -> list[float]:
    """Inter-token latencies: the gaps between consecutive token times."""
    return [later - earlier for earlier, later in zip(token_times, token_times[1:])]


def e2e(arrival_time: float, finished_time: float) -> float:
    """End-to-end latency: arrival to finish."""
    return finished_time - arrival_time


def percentile(values: Iterable[float], point: float) -> float:
    """The ``point``-th percentile (0..100) of non-empty ``values``, linearly interpolated."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ValueError("percentile of no values")
    if not 0.0 <= point <= 100.0:
        raise ValueError(f"percentile point must be in [0, 100], got {point}")
    return float(np.percentile(data, point))


def percentiles(values: Iterable[float], points: Iterable[float]) -> dict[str, float]:
    """``{"mean": ..., "p50": ..., "p99": ...}`` of ``values`` for each point; {} when there are none."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return {}
    out = {"mean": float(data.mean())}
    for point in points:
        out[f"p{point:g}"] = percentile(data, point)
    return out
