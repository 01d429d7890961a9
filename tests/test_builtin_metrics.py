"""The built-in latency sink: bounded state, its summary, and its options."""

from __future__ import annotations

import numpy as np
import pytest

from sagellm_core.builtin.metrics import LatencyOptions, LatencySink
from sagellm_core.config import EngineConfig, MetricsConfig
from sagellm_core.errors import ConfigError
from sagellm_core.metrics.base import RequestEvent
from sagellm_core.plugin_manager import create_plugin_manager
from sagellm_core.plugin_selection import validate_plugin_selection


def event(index: int, num_tokens: int) -> RequestEvent:
    start = float(index)
    times = tuple(start + 1.0 + 0.25 * i for i in range(num_tokens))
    return RequestEvent(request_id=f"r{index}", arrival_time=start, first_token_time=times[0], finished_time=times[-1],
                        token_times=times, num_prompt_tokens=3, num_output_tokens=num_tokens, num_cached_tokens=0,
                        finish_reason="length")


def test_state_is_bounded_by_the_window_and_summarises_the_recent_samples() -> None:
    sink = LatencySink(MetricsConfig(percentiles=[50.0, 100.0]), LatencyOptions(window=8))
    for index in range(1000):
        sink.on_request_finished(event(index, num_tokens=100))
    assert all(series.ring.nbytes == 8 * 8 for series in sink.series.values())
    stats = sink.snapshot()
    assert stats["ttft"] == {"mean": 1.0, "count": 8.0, "p50": 1.0, "p100": 1.0}
    assert stats["itl"]["count"] == 8.0 and stats["itl"]["p50"] == pytest.approx(0.25)
    assert stats["e2e"]["mean"] == pytest.approx(1.0 + 0.25 * 99)


def test_percentiles_interpolate_linearly_between_ranks() -> None:
    sink = LatencySink(MetricsConfig(percentiles=[50.0, 90.0]), LatencyOptions(window=100))
    for index, num_tokens in enumerate((2, 3, 4, 5)):  # tpot is 0.25 for each; e2e differs
        sink.on_request_finished(event(index, num_tokens))
    e2e = [1.0 + 0.25 * (n - 1) for n in (2, 3, 4, 5)]
    expected = np.percentile(e2e, [50.0, 90.0], method="linear")
    assert sink.snapshot()["e2e"]["p50"] == pytest.approx(expected[0])
    assert sink.snapshot()["e2e"]["p90"] == pytest.approx(expected[1])
    assert LatencySink().snapshot() == {"ttft": {}, "tpot": {}, "itl": {}, "e2e": {}}


def test_window_option_is_validated_with_its_path() -> None:
    manager = create_plugin_manager(entry_points=False)
    config = EngineConfig.from_dict({"metrics": {"options": {"latency": {"window": 0}}}})
    with pytest.raises(ConfigError, match=r"^metrics\.options\.latency\.window: must be >= 1, got 0$"):
        validate_plugin_selection(config, manager)
    config = EngineConfig.from_dict({"metrics": {"enabled": ["kv"], "options": {"latency": {"window": 5}}}})
    with pytest.raises(ConfigError, match=r"^metrics\.options\.latency: sink 'latency' is not in metrics\.enabled"):
        validate_plugin_selection(config, manager)
