"""One workload under the PD scheduler's modes (strict / time_share / hybrid): the TTFT-TPOT trade-off."""

from __future__ import annotations

import argparse
import math
from typing import Any

import attrs

from sagellm_bench.environment import device_info, environment
from sagellm_bench.offline import describe_engine, engine_session, rate_label, run_with_arrivals, warmup
from sagellm_bench.report import BenchReport, Table, labelled_scatter, write_report
from sagellm_bench.stats import latency_summary, throughput_summary
from sagellm_bench.workloads import poisson_arrivals, random_workload
from sagellm_core.config import EngineConfig

MODES = ("strict", "time_share", "hybrid")


@attrs.frozen
class PDBenchOptions:
    num_requests: int = 64
    input_len: tuple[int, int] = (100, 1024)
    output_len: tuple[int, int] = (100, 1024)
    request_rate: float = math.inf
    modes: tuple[str, ...] = MODES
    seed: int = 0
    temperature: float = 0.0
    output_dir: str = "bench_results"


def mode_config(config: EngineConfig, mode: str) -> EngineConfig:
    """``config`` with the ``pd`` scheduler in ``mode`` (other pd options kept when already pd)."""
    kept = dict(config.scheduler.options) if config.scheduler.name == "pd" else {}
    return config.evolve(scheduler={"name": "pd", "options": {**kept, "mode": mode}})


def run(config: EngineConfig, options: PDBenchOptions, args: argparse.Namespace | None = None) -> BenchReport:
    """Run every mode on the same workload and arrivals, write the files, return the report."""
    env = environment(args)
    results: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for mode in options.modes:
        with engine_session(mode_config(config, mode)) as llm:
            workload = random_workload(options.num_requests, options.input_len, options.output_len,
                                       llm.engine.vocab_size, options.seed)
            offsets = poisson_arrivals(len(workload.requests), options.request_rate, options.seed)
            warmup(llm, llm.engine.vocab_size)
            before = llm.get_stats()
            timings, elapsed = run_with_arrivals(llm, workload, offsets, options.temperature, f"pd {mode}")
            after = llm.get_stats()
            results[mode] = {**throughput_summary(timings, elapsed), **latency_summary(timings),
                             "scheduler": _delta(before.get("scheduler", {}), after.get("scheduler", {})),
                             "kv_blocks": [p.num_blocks for p in after["kv_pools"]],
                             "preemptions": after["num_preemptions"] - before["num_preemptions"]}
            setup = {**describe_engine(llm), "scheduler": "pd", "scheduler_options": "mode per run"}
            env["gpus"] = device_info(llm.engine.backend)
    setup.update(workload=workload.describe(), request_rate=rate_label(options.request_rate),
                 workload_params=workload.params)
    report = BenchReport("pd", env, setup, results, _tables(results), _comparisons(results), _notes())
    write_report(report, options.output_dir, _figures(results))
    return report


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Scheduler counters of the timed run only (the warm-up request excluded)."""
    return {k: v - before.get(k, 0) if isinstance(v, (int, float)) else v for k, v in after.items()}


def _tables(results: dict[str, Any]) -> list[Table]:
    table = Table("PD modes on one workload", ["mode", "mean TTFT ms", "p99 TTFT ms", "mean TPOT ms",
                                               "p99 TPOT ms", "output tok/s", "prefill/decode/mixed steps",
                                               "preemptions"])
    for mode, r in results.items():
        steps = r["scheduler"]
        table.rows.append([mode, r["ttft_ms"].get("mean"), r["ttft_ms"].get("p99"), r["tpot_ms"].get("mean"),
                           r["tpot_ms"].get("p99"), r["output_tokens_per_s"],
                           f"{steps.get('prefill_steps', 0)}/{steps.get('decode_steps', 0)}/"
                           f"{steps.get('mixed_steps', 0)}", r["preemptions"]])
    return [table]


def _comparisons(results: dict[str, Any]) -> list[str]:
    if "hybrid" not in results:
        return []
    base = results["hybrid"]
    lines = []
    for mode, r in results.items():
        if mode == "hybrid" or not r["ttft_ms"].get("mean") or not base["ttft_ms"].get("mean"):
            continue
        lines.append(f"{mode} vs hybrid: TTFT {r['ttft_ms']['mean'] / base['ttft_ms']['mean']:.2f}x, "
                     f"TPOT {r['tpot_ms']['mean'] / base['tpot_ms']['mean']:.2f}x, "
                     f"output tok/s {r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x")
    return lines


def _notes() -> list[str]:
    return ["strict splits the KV blocks into a prefill pool and a decode pool (copying blocks between them); "
            "time_share and hybrid use one pool of the same total size",
            "TTFT counts from arrival (submission) to the first token; all modes see the same seeded workload and "
            "arrival times"]


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    points = {mode: (r["ttft_ms"].get("mean", 0.0), r["tpot_ms"].get("mean", 0.0)) for mode, r in results.items()}
    figure = labelled_scatter(points, "mean TTFT (ms)", "mean TPOT (ms)",
                              "PD modes: TTFT vs TPOT (lower-left is better)")
    return {"ttft_vs_tpot": figure}
