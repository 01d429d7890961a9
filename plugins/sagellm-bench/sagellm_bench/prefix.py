"""Shared-prefix workload with prefix caching on (``prefix_lru``) and off (``no_reuse``), same seed."""

from __future__ import annotations

import argparse
import math
from typing import Any

import attrs

from sagellm_bench.environment import device_info, environment
from sagellm_bench.offline import (
    describe_engine,
    engine_session,
    rate_label,
    run_offline,
    run_with_arrivals,
    warmup,
)
from sagellm_bench.report import BenchReport, Table, panel_bars, write_report
from sagellm_bench.stats import RequestTiming, latency_summary, throughput_summary
from sagellm_bench.workloads import Workload, poisson_arrivals, shared_prefix_workload
from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM

POLICIES = ("prefix_lru", "no_reuse")


@attrs.frozen
class PrefixOptions:
    num_groups: int = 8
    requests_per_group: int = 8
    prefix_len: int = 512
    suffix_len: int = 32
    output_len: int = 32
    request_rate: float = math.inf
    seed: int = 0
    temperature: float = 0.0
    output_dir: str = "bench_results"


def run(config: EngineConfig, options: PrefixOptions, args: argparse.Namespace | None = None) -> BenchReport:
    """Run both policies on the same workload, write the files, return the report."""
    env = environment(args)
    results: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for policy in POLICIES:
        with engine_session(config.evolve(kv_cache={"policy": policy})) as llm:
            workload = shared_prefix_workload(options.num_groups, options.requests_per_group, options.prefix_len,
                                              options.suffix_len, options.output_len, llm.engine.vocab_size,
                                              options.seed)
            warmup(llm, llm.engine.vocab_size)
            before = llm.get_stats()["kv_pools"][0]
            timings, elapsed = _run_policy(llm, workload, options, policy)
            after = llm.get_stats()["kv_pools"][0]
            queried = after.prefix_query_tokens - before.prefix_query_tokens
            hits = after.prefix_hit_tokens - before.prefix_hit_tokens
            results[policy] = {"hit_rate": hits / queried if queried else 0.0, "prefix_hit_tokens": hits,
                               "prefix_query_tokens": queried, "cumulative_hit_rate": after.hit_rate,
                               **throughput_summary(timings, elapsed), **latency_summary(timings)}
            setup = {**describe_engine(llm), "kv_policy": "prefix_lru vs no_reuse"}
            env["gpus"] = device_info(llm.engine.backend)
    setup.update(workload=workload.describe(), request_rate=rate_label(options.request_rate),
                 workload_params=workload.params)
    report = BenchReport("prefix", env, setup, results, _tables(results), _comparisons(results), _notes())
    write_report(report, options.output_dir, _figures(results))
    return report


def _run_policy(llm: LLM, workload: Workload, options: PrefixOptions, desc: str
                ) -> tuple[list[RequestTiming], float]:
    """Poisson arrivals at a finite rate; at rate inf two waves: one request per group, then the rest.

    NOTE: requests admitted in the same step cannot share blocks that step is still computing, so
    "all at once" would measure the scheduler's step packing, not reuse. The first wave stands for the
    first user of each system prompt; the timings and the hit rate cover both waves.
    """
    if not math.isinf(options.request_rate):
        offsets = poisson_arrivals(len(workload.requests), options.request_rate, options.seed)
        return run_with_arrivals(llm, workload, offsets, options.temperature, desc)
    groups = options.num_groups
    first = attrs.evolve(workload, requests=workload.requests[:groups])
    rest = attrs.evolve(workload, requests=workload.requests[groups:])
    timings, elapsed = run_offline(llm, first, options.temperature, f"{desc} wave 1")
    if rest.requests:
        more, more_elapsed = run_offline(llm, rest, options.temperature, f"{desc} wave 2")
        timings, elapsed = timings + more, elapsed + more_elapsed
    return timings, elapsed


def _tables(results: dict[str, Any]) -> list[Table]:
    table = Table("Shared-prefix workload", ["KV policy", "hit rate", "mean TTFT ms", "p99 TTFT ms",
                                             "mean TPOT ms", "output tok/s", "req/s", "elapsed s"])
    for policy, r in results.items():
        table.rows.append([policy, r["hit_rate"], r["ttft_ms"].get("mean"), r["ttft_ms"].get("p99"),
                           r["tpot_ms"].get("mean"), r["output_tokens_per_s"], r["requests_per_s"], r["elapsed_s"]])
    return [table]


def _comparisons(results: dict[str, Any]) -> list[str]:
    on, off = results["prefix_lru"], results["no_reuse"]
    lines = [f"throughput prefix_lru / no_reuse: {on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}x"]
    if on["ttft_ms"].get("mean") and off["ttft_ms"].get("mean"):
        lines.append(f"mean TTFT no_reuse / prefix_lru: {off['ttft_ms']['mean'] / on['ttft_ms']['mean']:.2f}x "
                     f"({off['ttft_ms']['mean']:.1f} ms vs {on['ttft_ms']['mean']:.1f} ms)")
    return lines


def _notes() -> list[str]:
    return ["hit rate = prompt tokens served from cached blocks / prompt tokens looked up, counted over the "
            "timed requests only (KV pool 0 statistics before and after); the warm-up request is excluded",
            "requests interleave round-robin over the groups; at rate inf the first request of each group runs "
            "first (wave 1) and the rest follow together (wave 2); both policies see the same seeded workload"]


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    panels = {
        "hit rate": {p: r["hit_rate"] for p, r in results.items()},
        "mean TTFT ms": {p: r["ttft_ms"].get("mean", 0.0) for p, r in results.items()},
        "output tok/s": {p: r["output_tokens_per_s"] for p, r in results.items()},
    }
    return {"policies": panel_bars(panels, "Prefix caching on a shared-prefix workload")}
