"""Offline throughput on nano-vllm's seeded random workload, with transformers as the peer.

Order of work: sageLLM (warm-up, then the timed `LLM.generate`), release its KV cache, measure the
device's matmul FLOP/s, then transformers on the same model object (static batching; continuous
batching too on GPUs). Each engine's elapsed time is set against the workload's compute floor.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import attrs

from sagellm_bench import floors, hf_peer
from sagellm_bench.environment import device_info, environment
from sagellm_bench.offline import describe_engine, free_device_memory, release_engine, run_offline, warmup
from sagellm_bench.report import BenchReport, Table, panel_bars, write_report
from sagellm_bench.stats import latency_summary, throughput_summary
from sagellm_bench.workloads import Workload, random_workload
from sagellm_core.backend import Backend
from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM

log = logging.getLogger("sagellm.bench")
SAGELLM = "sageLLM"
HF_STATIC = "HF generate (static)"
HF_CONTINUOUS = "HF continuous batching"


@attrs.frozen
class ThroughputOptions:
    """Workload and peers. ``hf_continuous``: ``auto`` runs it on GPUs only, ``on`` everywhere.
    ``hf_model``: ``same`` runs transformers on the model object sageLLM ran (its quantized layers
    included); ``transformers`` has transformers load the checkpoint itself (`hf_peer.load_own`)."""

    num_requests: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    temperature: float = 0.6
    compare_hf: bool = False
    hf_batch_size: int = 32
    hf_continuous: str = "auto"
    hf_model: str = "same"
    output_dir: str = "bench_results"


def run(config: EngineConfig, options: ThroughputOptions, args: argparse.Namespace | None = None) -> BenchReport:
    """Run the benchmark, write its files, return the report."""
    if options.compare_hf and options.hf_model == "transformers" and config.model.load_format == "dummy":
        raise ValueError("--hf-model transformers loads the checkpoint: random-weight shapes (load_format "
                         "dummy) have none; use --hf-model same")
    env = environment(args)
    llm = LLM(config=config)
    try:
        workload = random_workload(options.num_requests, options.input_len, options.output_len,
                                   llm.engine.vocab_size, options.seed)
        print(workload.describe(), flush=True)
        warmup(llm, llm.engine.vocab_size)
        before = llm.get_stats()
        timings, elapsed = run_offline(llm, workload, options.temperature, SAGELLM)
        after = llm.get_stats()
        setup = describe_engine(llm)
        backend, dtype = llm.engine.backend, llm.engine.dtype
        env["gpus"] = device_info(backend)
    finally:
        model = release_engine(llm)
    results: dict[str, Any] = {SAGELLM: {
        **throughput_summary(timings, elapsed), **latency_summary(timings),
        "preemptions": after["num_preemptions"] - before["num_preemptions"],
        "forward_tokens": after["forward_tokens"] - before["forward_tokens"],
    }}
    matmul = floors.measure_matmul_flops(backend, dtype)
    params = floors.param_counts(model)
    if options.compare_hf:
        if options.hf_model == "transformers":
            del model
            free_device_memory()
            model = hf_peer.load_own(config.model.path, config.model.gguf_file, dtype, backend.device())
        results.update(_run_peers(model, workload, options, backend))
    forward_tokens = sum(r.prompt_len + r.output_len - 1 for r in workload.requests)
    for result in results.values():
        if "elapsed_s" in result:
            result["compute_floor"] = floors.compute_floor(params, forward_tokens, workload.num_output_tokens,
                                                           matmul["flops_per_s"], result["elapsed_s"])
    setup.update(workload=workload.describe(), temperature=options.temperature, parameters=params.total,
                 matmul=matmul, param_counts=attrs.asdict(params), workload_params=workload.params)
    report = BenchReport("throughput", env, setup, results, _tables(results), _comparisons(results),
                         _notes(options, params, matmul))
    write_report(report, options.output_dir, _figures(results))
    return report


def _run_peers(model: Any, workload: Workload, options: ThroughputOptions, backend: Backend) -> dict[str, Any]:
    peers: dict[str, Any] = {}
    vocab = model.get_input_embeddings().weight.shape[0]
    try:
        hf_peer.warmup(model, vocab)
        peers[HF_STATIC] = hf_peer.run_static(model, workload, options.hf_batch_size, options.temperature,
                                              backend.synchronize)
    except Exception as exc:  # keep sageLLM's figures when the peer fails; say why
        log.exception("transformers static batching failed")
        peers[HF_STATIC] = {"error": f"{type(exc).__name__}: {exc}"}
    wanted = options.hf_continuous == "on" or (options.hf_continuous == "auto" and backend.device_type == "cuda")
    if wanted and hf_peer.continuous_batching_available(model):
        free_device_memory()  # transformers sizes its paged cache from the free device memory
        try:
            peers[HF_CONTINUOUS] = hf_peer.run_continuous(model, workload, options.temperature, backend.synchronize)
        except Exception as exc:
            log.exception("transformers continuous batching failed")
            peers[HF_CONTINUOUS] = {"error": f"{type(exc).__name__}: {exc}"}
    return peers


def _tables(results: dict[str, Any]) -> list[Table]:
    table = Table("Throughput", ["engine", "requests", "elapsed s", "req/s", "output tok/s", "total tok/s",
                                 "compute floor s", "% of floor"])
    for name, r in results.items():
        if "error" in r:
            table.rows.append([name, "error", r["error"], "", "", "", "", ""])
            continue
        floor = r.get("compute_floor", {})
        table.rows.append([name, r["completed"], r["elapsed_s"], r["requests_per_s"], r["output_tokens_per_s"],
                           r["total_tokens_per_s"], floor.get("floor_s"), 100.0 * floor.get("fraction_achieved", 0)])
    return [table]


def _comparisons(results: dict[str, Any]) -> list[str]:
    ours = results[SAGELLM]
    lines = []
    for name, peer in results.items():
        if name == SAGELLM or "error" in peer or not peer.get("output_tokens_per_s"):
            continue
        lines.append(f"{SAGELLM} / {name}: {ours['output_tokens_per_s'] / peer['output_tokens_per_s']:.2f}x "
                     f"output tok/s ({ours['output_tokens_per_s']:.1f} vs {peer['output_tokens_per_s']:.1f})")
    if len(results) == 1:
        lines.append("no peer measured (pass --compare hf)")
    return lines


def _notes(options: ThroughputOptions, params: floors.ParamCounts, matmul: dict[str, Any]) -> list[str]:
    return [
        f"compute floor: matmul FLOPs (2 x {params.body:,} decoder params x tokens through the model + "
        f"2 x {params.lm_head:,} LM-head params x output tokens) / measured {matmul['size']}x{matmul['size']} "
        f"{matmul['dtype']} matmul rate {matmul['flops_per_s'] / 1e9:.1f} GFLOP/s; attention FLOPs not counted",
        "every engine generates exactly the requested output lengths (EOS ignored); HF static batches run "
        f"in workload order, {options.hf_batch_size} per batch, left-padded, each generating its longest "
        "request's length; only requested tokens count as output",
        (f"transformers runs the model object sageLLM loaded (same weights, dtype, device) with "
         f"attn_implementation={hf_peer.PEER_ATTENTION!r}; sageLLM's KV cache is freed first"
         if options.hf_model == "same" else
         "transformers loads the checkpoint itself (from_pretrained in sageLLM's compute dtype, no sageLLM "
         f"layers: a GGUF comes de-quantized) with attn_implementation={hf_peer.PEER_ATTENTION!r}; "
         "sageLLM's engine is released first"),
    ]


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    ok = {name: r for name, r in results.items() if "error" not in r}
    floor_s = ok[SAGELLM]["compute_floor"]["floor_s"]
    panels = {
        "output tok/s": {n: r["output_tokens_per_s"] for n, r in ok.items()},
        "total tok/s": {n: r["total_tokens_per_s"] for n, r in ok.items()},
        "elapsed s": {n: r["elapsed_s"] for n, r in ok.items()},
    }
    figure = panel_bars(panels, "Offline throughput (same workload, same weights)",
                        {"elapsed s": ("compute floor", floor_s)})
    return {"throughput": figure}
