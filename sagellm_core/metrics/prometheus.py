"""Prometheus metric sink: engine events as prometheus_client metrics in the sink's own registry.

Every sink owns a `CollectorRegistry` (never the process-global one), so several engines or test
apps in one process do not collide. `sagellm serve` exposes `exposition()` at ``GET /metrics``.

NOTE: updated from the engine loop thread and read from the server thread; prometheus_client
metrics are thread-safe, and the sink keeps no other shared state besides the KV counter baselines,
which only the engine thread touches.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sagellm_core.metrics.base import RequestEvent, StepEvent

PREFIX = "sagellm_"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class PrometheusSink:
    """Latency histograms, queue and KV gauges, token / request / preemption counters.

    Histograms (seconds): ``sagellm_time_to_first_token_seconds``, ``sagellm_time_per_output_token_seconds``,
    ``sagellm_inter_token_latency_seconds``, ``sagellm_e2e_request_latency_seconds``.
    Gauges: ``sagellm_num_requests_running``, ``sagellm_num_requests_waiting``,
    ``sagellm_kv_cache_usage_ratio{pool}``, ``sagellm_prefix_cache_hit_rate{pool}`` (since start).
    Counters: ``sagellm_generation_tokens_total``, ``sagellm_prompt_tokens_total`` (per finished
    sequence, so a request with ``n > 1`` counts its prompt ``n`` times),
    ``sagellm_request_finished_total{finish_reason}`` (per sequence), ``sagellm_num_preemptions_total``,
    ``sagellm_prefix_cache_queries_total{pool}`` and ``sagellm_prefix_cache_hits_total{pool}`` (tokens).
    KV tiers (gauges per ``tier``): ``sagellm_kv_tier_blocks``, ``sagellm_kv_tier_bytes``,
    ``sagellm_kv_tier_hit_tokens``, ``sagellm_kv_tier_loads``, ``sagellm_kv_tier_load_bandwidth_bytes_per_second``.
    """

    def __init__(self, config: Any = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token (arrival to first "
                              "sampled token).", buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", buckets=TOKEN_BUCKETS, registry=reg)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive output tokens.",
                             buckets=TOKEN_BUCKETS, registry=reg)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Arrival to finish, per sequence.",
                             buckets=E2E_BUCKETS, registry=reg)
        self.running = Gauge(PREFIX + "num_requests_running", "Sequences in the running queue.", registry=reg)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Sequences in the waiting queue.", registry=reg)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_ratio", "Fraction of KV blocks referenced by requests.",
                              ["pool"], registry=reg)
        self.hit_rate = Gauge(PREFIX + "prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens "
                              "since start.", ["pool"], registry=reg)
        self.prefix_queries = Counter(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the "
                                      "prefix cache.", ["pool"], registry=reg)
        self.prefix_hits = Counter(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   ["pool"], registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Sampled output tokens.", registry=reg)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished sequences.",
                                     registry=reg)
        self.finished = Counter(PREFIX + "request_finished", "Finished sequences by finish reason.",
                                ["finish_reason"], registry=reg)
        self.preemptions = Counter(PREFIX + "num_preemptions", "Preempted sequences.", registry=reg)
        self._kv_seen: dict[int, tuple[int, int]] = {}
        self.tier_blocks = Gauge(PREFIX + "kv_tier_blocks", "KV blocks held by a tier below the device pool.",
                                 ["tier"], registry=reg)
        self.tier_bytes = Gauge(PREFIX + "kv_tier_bytes", "Bytes held by a KV tier.", ["tier"], registry=reg)
        self.tier_hit_tokens = Gauge(PREFIX + "kv_tier_hit_tokens", "Prompt tokens loaded from a KV tier "
                                     "since start.", ["tier"], registry=reg)
        self.tier_loads = Gauge(PREFIX + "kv_tier_loads", "Blocks loaded from a KV tier into the device pool "
                                "since start.", ["tier"], registry=reg)
        self.tier_load_bandwidth = Gauge(PREFIX + "kv_tier_load_bandwidth_bytes_per_second", "Bytes per second "
                                         "of the copies from a KV tier into the device pool.", ["tier"],
                                         registry=reg)

    # ---- events (engine thread) ----------------------------------------------------------------
    def on_step(self, event: StepEvent) -> None:
        self.running.set(event.num_running)
        self.waiting.set(event.num_waiting)
        self.generation_tokens.inc(event.num_output_tokens)
        if event.num_preempted:
            self.preemptions.inc(event.num_preempted)
        for index, stats in enumerate(event.kv):
            pool = str(index)
            self.kv_usage.labels(pool).set(stats.usage)
            self.hit_rate.labels(pool).set(stats.hit_rate)
            queried, hits = self._kv_seen.get(index, (0, 0))
            self.prefix_queries.labels(pool).inc(max(0, stats.prefix_query_tokens - queried))
            self.prefix_hits.labels(pool).inc(max(0, stats.prefix_hit_tokens - hits))
            self._kv_seen[index] = (stats.prefix_query_tokens, stats.prefix_hit_tokens)
        hit_tokens = event.kv[0].tier_hit_tokens if event.kv else ()
        for level, tier in enumerate(event.kv_tiers):
            self.tier_blocks.labels(tier.name).set(tier.num_blocks)
            self.tier_bytes.labels(tier.name).set(tier.bytes)
            self.tier_hit_tokens.labels(tier.name).set(hit_tokens[level] if level < len(hit_tokens) else 0)
            self.tier_loads.labels(tier.name).set(tier.loads)
            self.tier_load_bandwidth.labels(tier.name).set(tier.load_bandwidth)

    def on_request_finished(self, event: RequestEvent) -> None:
        if event.ttft is not None:
            self.ttft.observe(event.ttft)
        if event.tpot is not None:
            self.tpot.observe(event.tpot)
        for gap in event.itls:
            self.itl.observe(gap)
        self.e2e.observe(event.e2e)
        self.prompt_tokens.inc(event.num_prompt_tokens)
        self.finished.labels(event.finish_reason).inc()

    # ---- reading (any thread) ------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Current values keyed by sample name with labels, e.g. ``request_finished_total{finish_reason="stop"}``.

        Histograms contribute their ``_count`` and ``_sum`` samples only (buckets are in `exposition`).
        """
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")) or math.isnan(sample.value):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                key = sample.name.removeprefix(PREFIX) + (f"{{{labels}}}" if labels else "")
                out[key] = sample.value
        return out

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``GET /metrics``)."""
        return generate_latest(self.registry)
