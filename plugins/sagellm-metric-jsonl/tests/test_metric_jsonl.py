"""Tests of the JSONL metric sink with hand-made events (no model), its options and registration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sagellm_metric_jsonl as jsonl
from sagellm_core.config import EngineConfig, MetricsConfig
from sagellm_core.errors import ConfigError
from sagellm_core.metrics.base import RequestEvent
from sagellm_core.plugin_manager import create_plugin_manager
from sagellm_core.plugin_selection import validate_plugin_selection


def event(rid: str, output_tokens: int) -> RequestEvent:
    times = tuple(10.0 + 0.5 * i for i in range(output_tokens))
    return RequestEvent(request_id=rid, arrival_time=9.0, first_token_time=times[0], finished_time=times[-1],
                        token_times=times, num_prompt_tokens=7, num_output_tokens=output_tokens,
                        num_cached_tokens=4, finish_reason="length")


def test_one_line_per_finished_request(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    sink = jsonl.JSONLSink(MetricsConfig(), jsonl.JSONLOptions(path=str(path), include_token_times=True))
    sink.on_request_finished(event("a", 3))
    sink.on_request_finished(event("b", 1))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["request_id"] for line in lines] == ["a", "b"]
    assert lines[0] == {"request_id": "a", "num_prompt_tokens": 7, "num_output_tokens": 3, "num_cached_tokens": 4,
                        "finish_reason": "length", "ttft": 1.0, "tpot": 0.5, "e2e": 2.0,
                        "token_times": [1.0, 1.5, 2.0]}
    assert lines[1]["tpot"] is None  # one output token: no time per output token
    assert sink.snapshot() == {"path": str(path), "lines": 2}


def test_options_come_from_the_config_and_errors_name_their_path(tmp_path: Path) -> None:
    manager = create_plugin_manager(entry_points=False, extra={"metric_jsonl": jsonl})
    config = EngineConfig.from_dict({"metrics": {"extra": ["jsonl"], "options": {"jsonl": {"path": str(tmp_path / "x")}}}})
    sinks = validate_plugin_selection(config, manager).create_metric_sinks(config.metrics)
    assert list(sinks) == ["latency", "throughput", "kv", "jsonl"]  # extra extends the defaults
    assert isinstance(sinks["jsonl"], jsonl.JSONLSink) and sinks["jsonl"].path == tmp_path / "x"
    for options, error in (({}, r"metrics\.options\.jsonl\.path: required, but missing"),
                           ({"path": ""}, r"metrics\.options\.jsonl\.path: Length of 'path' must be >= 1"),
                           ({"path": "x", "colour": 1}, r"metrics\.options\.jsonl\.colour: unknown key")):
        bad = config.evolve(metrics={"options": {"jsonl": options}})
        with pytest.raises(ConfigError, match=error):
            validate_plugin_selection(bad, manager)
