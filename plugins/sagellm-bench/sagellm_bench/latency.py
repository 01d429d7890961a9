"""Batch-1 decode latency (TTFT, TPOT, ITL) against the weight-read floor, with transformers as the peer.

Each iteration uses a different seeded prompt so prefix caching cannot shortcut the prefill.
"""

from __future__ import annotations

import argparse
from typing import Any

import attrs

from sagellm_bench import floors, hf_peer
from sagellm_bench.environment import device_info, environment
from sagellm_bench.offline import describe_engine, release_engine, stream_one, warmup
from sagellm_bench.report import BenchReport, Table, line_chart, panel_bars, write_report
from sagellm_bench.stats import RequestTiming, summarize
from sagellm_bench.workloads import BenchRequest, fixed_workload
from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM
from sagellm_core.metrics.latency import percentile

SAGELLM = "sageLLM"
HF = "HF generate"


@attrs.frozen
class LatencyOptions:
    input_len: int = 128
    output_len: int = 256
    num_iters: int = 5
    num_warmup: int = 1
    seed: int = 0
    temperature: float = 0.0
    compare_hf: bool = False
    output_dir: str = "bench_results"


def run(config: EngineConfig, options: LatencyOptions, args: argparse.Namespace | None = None) -> BenchReport:
    """Run the benchmark, write its files, return the report."""
    env = environment(args)
    llm = LLM(config=config)
    try:
        requests = fixed_workload(options.num_warmup + options.num_iters, options.input_len, options.output_len,
                                  llm.engine.vocab_size, options.seed).requests
        timings = _interleaved(llm, requests, options)
        setup = describe_engine(llm)
        backend = llm.engine.backend
        env["gpus"] = device_info(backend)
    finally:
        model = release_engine(llm)
    bandwidth = floors.measure_bandwidth(backend)
    read_bandwidth = floors.measure_read_bandwidth(backend)
    params = floors.param_counts(model)
    results: dict[str, Any] = {name: _summary(runs) for name, runs in timings.items()}
    for result in results.values():
        tpot = result["tpot_ms"] / 1000.0
        result["weight_read_floor"] = floors.weight_read_floor(params, bandwidth["bytes_per_s"], tpot)
        result["weight_read_floor_read_only"] = floors.weight_read_floor(params, read_bandwidth["bytes_per_s"], tpot)
    setup.update(input_len=options.input_len, output_len=options.output_len, num_iters=options.num_iters,
                 temperature=options.temperature, parameters=params.total, bandwidth=bandwidth,
                 read_bandwidth=read_bandwidth, param_counts=attrs.asdict(params))
    report = BenchReport("latency", env, setup, results, _tables(results), _comparisons(results),
                         _notes(params, bandwidth, read_bandwidth))
    write_report(report, options.output_dir, _figures(results))
    return report


def _interleaved(llm: LLM, requests: list[BenchRequest], options: LatencyOptions) -> dict[str, list[RequestTiming]]:
    """Warm both engines up, then alternate them iteration by iteration.

    NOTE: alternating puts both engines under the same background load (a shared machine drifts
    over minutes). transformers runs on the engine's model object while the engine idles; batch 1
    needs little memory beside sageLLM's KV pool. It runs on the engine's own thread (`LLM.call`), so
    both engines use the same CPU thread team.
    """
    from tqdm import tqdm

    model, temperature = llm.engine.model, options.temperature
    warmup(llm, llm.engine.vocab_size)
    if options.compare_hf:
        llm.call(lambda engine: hf_peer.warmup(model, engine.vocab_size))
    for request in requests[:options.num_warmup]:
        stream_one(llm, request, temperature)
        if options.compare_hf:
            llm.call(lambda _, r=request: hf_peer.run_latency(model, r, temperature))
    timings: dict[str, list[RequestTiming]] = {SAGELLM: []}
    if options.compare_hf:
        timings[HF] = []
    for request in tqdm(requests[options.num_warmup:], desc="latency iterations", unit="iter"):
        timings[SAGELLM].append(stream_one(llm, request, temperature))
        if options.compare_hf:
            timings[HF].append(llm.call(lambda _, r=request: hf_peer.run_latency(model, r, temperature)))
    return timings


def _summary(timings: list[RequestTiming]) -> dict[str, Any]:
    """Medians over iterations (ms) plus the ITL trace of the median-TPOT iteration."""
    tpots = [t.tpot for t in timings if t.tpot is not None]
    median_run = sorted(timings, key=lambda t: t.tpot or 0.0)[len(timings) // 2]
    return {
        "iterations": len(timings),
        "ttft_ms": percentile([t.ttft for t in timings if t.ttft is not None], 50.0) * 1000.0,
        "tpot_ms": percentile(tpots, 50.0) * 1000.0 if tpots else None,
        "e2e_ms": percentile([t.e2e for t in timings], 50.0) * 1000.0,
        "output_tokens": median_run.output_len,
        "itl_ms": summarize(itl for t in timings for itl in t.itls),
        "itl_trace_ms": [x * 1000.0 for x in median_run.itls],
        "per_iteration": [{"ttft_ms": (t.ttft or 0) * 1000.0, "tpot_ms": (t.tpot or 0) * 1000.0} for t in timings],
    }


def _tables(results: dict[str, Any]) -> list[Table]:
    table = Table("Batch-1 latency (median over iterations)",
                  ["engine", "TTFT ms", "TPOT ms", "ITL p99 ms", "E2E ms", "weight-read floor ms", "TPOT / floor",
                   "floor ms at read-only bandwidth", "TPOT / that floor"])
    for name, r in results.items():
        floor, strict = r["weight_read_floor"], r["weight_read_floor_read_only"]
        table.rows.append([name, r["ttft_ms"], r["tpot_ms"], r["itl_ms"].get("p99"), r["e2e_ms"],
                           floor["floor_s"] * 1000.0, floor["tpot_over_floor"],
                           strict["floor_s"] * 1000.0, strict["tpot_over_floor"]])
    return [table]


def _comparisons(results: dict[str, Any]) -> list[str]:
    if HF not in results:
        return ["no peer measured (pass --compare hf)"]
    ours, peer = results[SAGELLM], results[HF]
    return [f"TPOT: {HF} / {SAGELLM} = {peer['tpot_ms'] / ours['tpot_ms']:.2f}x "
            f"({peer['tpot_ms']:.2f} ms vs {ours['tpot_ms']:.2f} ms; >1 means sageLLM is faster)",
            f"TTFT: {HF} / {SAGELLM} = {peer['ttft_ms'] / ours['ttft_ms']:.2f}x "
            f"({peer['ttft_ms']:.1f} ms vs {ours['ttft_ms']:.1f} ms)"]


def _notes(params: floors.ParamCounts, bandwidth: dict[str, Any], read_bandwidth: dict[str, Any]) -> list[str]:
    return [
        f"weight-read floor: {params.decode_bytes / 2**20:,.1f} MiB of weights per decode step (decoder layers "
        f"+ LM head) / measured copy bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s "
        f"({bandwidth['bytes'] / 2**20:.0f} MiB tensor copy, read + write); KV-cache reads not counted",
        f"the stricter floor divides by the read-only bandwidth of a sum over a {read_bandwidth['bytes'] / 2**20:.0f} "
        f"MiB tensor: {read_bandwidth['bytes_per_s'] / 1e9:.1f} GB/s",
        "TTFT counts from submitting the request to the first token reaching the caller; TPOT = (last - first "
        "token time) / (tokens - 1); both engines: same temperature (0 = greedy), EOS ignored, "
        "prompts of random token ids",
        "transformers runs the model object sageLLM loaded (same weights, dtype, device) with "
        f"attn_implementation={hf_peer.PEER_ATTENTION!r}; iterations alternate between the engines",
    ]


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    floor_ms = results[SAGELLM]["weight_read_floor"]["floor_s"] * 1000.0
    bars = panel_bars({"TPOT ms": {n: r["tpot_ms"] for n, r in results.items()},
                       "TTFT ms": {n: r["ttft_ms"] for n, r in results.items()}},
                      "Batch-1 latency", {"TPOT ms": ("weight-read floor", floor_ms)})
    trace = line_chart({n: (list(range(2, len(r["itl_trace_ms"]) + 2)), r["itl_trace_ms"])
                        for n, r in results.items()}, "output token", "inter-token latency (ms)",
                       "Inter-token latency of the median iteration")
    return {"tpot": bars, "itl": trace}
