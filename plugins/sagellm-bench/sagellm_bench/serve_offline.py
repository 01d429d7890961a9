"""``sagellm bench serve --compare offline``: the engine in-process on the server's requests and arrival
times, and the server / offline ratios the report prints."""

from __future__ import annotations

from typing import Any

from sagellm_bench.offline import engine_session, run_with_arrivals, warmup
from sagellm_bench.report import Table
from sagellm_bench.stats import latency_summary, throughput_summary
from sagellm_bench.workloads import Workload
from sagellm_core.config import EngineConfig


def run_offline_peer(config: EngineConfig, workload: Workload, offsets: dict[str, list[float]],
                     temperature: float) -> dict[str, Any]:
    """The engine in-process (`LLM`) on the server's requests, once per rate label with its arrival offsets."""
    results: dict[str, Any] = {}
    with engine_session(config) as llm:
        warmup(llm, llm.engine.vocab_size)
        for rate, rate_offsets in offsets.items():
            timings, elapsed = run_with_arrivals(llm, workload, rate_offsets, temperature, f"offline rate {rate}")
            results[rate] = {**throughput_summary(timings, elapsed), **latency_summary(timings)}
    return results


def ratios(server: dict[str, Any], offline: dict[str, Any]) -> dict[str, float | None]:
    """Server / offline for throughput (below 1: the server is slower) and latencies (above 1: slower)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out = {"output_tokens_per_s": ratio(server["output_tokens_per_s"], offline["output_tokens_per_s"])}
    for metric, stat in (("ttft_ms", "mean"), ("ttft_ms", "p99"), ("tpot_ms", "mean"), ("tpot_ms", "p99")):
        out[f"{metric.removesuffix('_ms')}_{stat}"] = ratio(server[metric].get(stat), offline[metric].get(stat))
    return out


def offline_table(results: dict[str, Any]) -> Table:
    table = Table("Server vs the offline engine (same requests, same arrival times)",
                  ["rate req/s", "server output tok/s", "offline output tok/s", "server / offline",
                   "TTFT mean/med/p99 ms offline", "TPOT mean/med/p99 ms offline", "TTFT p99 ratio",
                   "TPOT mean ratio"])
    for rate, r in results.items():
        offline, ratio = r["offline"], r["server_over_offline"]
        table.rows.append([rate, r["output_tokens_per_s"], offline["output_tokens_per_s"],
                           ratio["output_tokens_per_s"], three(offline["ttft_ms"]), three(offline["tpot_ms"]),
                           ratio["ttft_p99"], ratio["tpot_mean"]])
    return table


def offline_comparison(rate: str, result: dict[str, Any]) -> str:
    """One line: server / offline output tok/s, TTFT p99 and TPOT mean."""
    ratio = result["server_over_offline"]
    return (f"rate {rate}: server / offline engine = {_x(ratio['output_tokens_per_s'])} output tok/s "
            f"({result['output_tokens_per_s']:.1f} vs {result['offline']['output_tokens_per_s']:.1f}); "
            f"TTFT p99 {_x(ratio['ttft_p99'])}, TPOT mean {_x(ratio['tpot_mean'])}")


def three(summary: dict[str, float]) -> str:
    """``mean/median/p99`` of a summary in ms, or ``-`` when it is empty."""
    return "/".join(f"{summary[k]:.1f}" for k in ("mean", "median", "p99")) if summary.get("count") else "-"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
