"""sageLLM metric-sink plugin ``jsonl``: appends one JSON object per finished request to a file.

Each line holds the request id, token counts, the finish reason and the latencies (seconds):
``{"request_id": "req-3", "num_prompt_tokens": 12, "num_output_tokens": 32, "num_cached_tokens": 0,
"finish_reason": "length", "ttft": 0.041, "tpot": 0.012, "e2e": 0.43}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sagellm_core.hookspecs import Register, hookimpl
from sagellm_core.options import with_path

if TYPE_CHECKING:
    from sagellm_core.config import MetricsConfig
    from sagellm_core.metrics.base import RequestEvent, StepEvent

SAGELLM_PLUGIN_API = ">=1.0,<2"


@attrs.frozen
class JSONLOptions:
    """``metrics.options.jsonl``."""

    path: str = attrs.field(validator=with_path(attrs.validators.min_len(1)))
    """File the lines are appended to (created if missing; its directory must exist)."""
    include_token_times: bool = False
    """Also write ``token_times``: when each output token arrived (seconds since the request arrived)."""


class JSONLSink:
    """Appends a line per finished request; ``snapshot()`` reports the file and the lines written."""

    def __init__(self, config: MetricsConfig, options: JSONLOptions) -> None:
        self.options = options
        self.path = Path(options.path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"metrics.options.jsonl.path: directory {self.path.parent} does not exist")
        self.lines = 0

    def on_step(self, event: StepEvent) -> None:
        pass

    def on_request_finished(self, event: RequestEvent) -> None:
        record: dict[str, Any] = {
            "request_id": event.request_id,
            "num_prompt_tokens": event.num_prompt_tokens,
            "num_output_tokens": event.num_output_tokens,
            "num_cached_tokens": event.num_cached_tokens,
            "finish_reason": event.finish_reason,
            "ttft": event.ttft,
            "tpot": event.tpot,
            "e2e": event.e2e,
        }
        if self.options.include_token_times:
            record["token_times"] = [t - event.arrival_time for t in event.token_times]
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        self.lines += 1

    def snapshot(self) -> dict[str, Any]:
        return {"path": str(self.path), "lines": self.lines}


@hookimpl
def sagellm_register_metrics(register: Register) -> None:
    """Register the ``jsonl`` sink with its options class."""
    register("jsonl", JSONLSink, options=JSONLOptions)
