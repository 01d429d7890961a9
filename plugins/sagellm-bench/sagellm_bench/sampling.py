"""Sampling parameters at full speed: nano-vllm's workload under each sampling mix, as a ratio to the
plain path (temperature only) of the same engine in the same run; the default configuration
(``LLM(model)``, budgets derived from the device) against the tuned one; and the first timed run
after one short warm-up against the second.

Order of work: the tuned engine (the command's engine options) starts, runs one short request, then
the plain workload twice (first and second run), then every mix; it is released and the default
engine (the model alone, no budget flags) starts, runs one short request and the plain workload.
Every request generates exactly its requested length (EOS ignored), so every mix produces the same
tokens count and the ratio of elapsed times is the ratio of throughputs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import attrs

from sagellm_bench.environment import device_info, environment
from sagellm_bench.offline import describe_engine, release_engine
from sagellm_bench.report import BenchReport, Table, panel_bars, write_report
from sagellm_bench.workloads import BenchRequest, Workload, random_workload
from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM
from sagellm_core.sampling_params import SamplingParams

ParamsFor = Callable[[BenchRequest, int, float], SamplingParams]


def _params(**extra: Any) -> ParamsFor:
    def make(request: BenchRequest, index: int, temperature: float) -> SamplingParams:
        return SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=temperature, **extra)
    return make


def _seeded(**extra: Any) -> ParamsFor:
    def make(request: BenchRequest, index: int, temperature: float) -> SamplingParams:
        return SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=temperature,
                              seed=index, **extra)
    return make


def _quarters(*parts: ParamsFor) -> ParamsFor:
    def make(request: BenchRequest, index: int, temperature: float) -> SamplingParams:
        return parts[index % len(parts)](request, index, temperature)
    return make


PLAIN = "plain"
MIXES: dict[str, ParamsFor] = {
    PLAIN: _params(),
    "repetition_penalty=1.1": _params(repetition_penalty=1.1),
    "presence=0.5+frequency=0.5": _params(presence_penalty=0.5, frequency_penalty=0.5),
    "top_p=0.95,top_k=50": _params(top_p=0.95, top_k=50),
    "top_p=0.95": _params(top_p=0.95),
    "min_p=0.05": _params(min_p=0.05),
    "logprobs=5": _params(logprobs=5),
    "seeded": _seeded(),
    "mix (plain / top-p / penalty / seeded+logprobs)": _quarters(
        _params(), _params(top_p=0.95, top_k=50), _params(repetition_penalty=1.1), _seeded(logprobs=5)),
}
"""Name -> the params of request ``index``; the issue's mixes, plus top-p alone (the bisection path)."""


@attrs.frozen
class SamplingBenchOptions:
    num_requests: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    seed: int = 0
    temperature: float = 0.6
    mixes: tuple[str, ...] = tuple(MIXES)
    compare_defaults: bool = True
    output_dir: str = "bench_results"


def timed_run(llm: LLM, workload: Workload, params_for: ParamsFor, temperature: float, label: str) -> dict[str, Any]:
    """One `LLM.generate` of the whole workload from an empty prefix cache (every run prefills the
    same tokens); elapsed seconds and output tokens per second."""
    llm.reset_prefix_cache()
    prompts = [r.prompt_token_ids for r in workload.requests]
    params = [params_for(r, i, temperature) for i, r in enumerate(workload.requests)]
    print(f"[{label}] {len(prompts)} requests", flush=True)
    phases = dict(getattr(llm.engine, "phase_seconds", {}))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    spent = {name: seconds - phases.get(name, 0.0) for name, seconds in getattr(llm.engine, "phase_seconds", {}).items()}
    print(f"[{label}] {elapsed:.2f} s, {tokens / elapsed:.0f} output tok/s; host phases (s): "
          + ", ".join(f"{name} {seconds:.2f}" for name, seconds in spent.items()), flush=True)
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed if elapsed else 0.0,
            "phase_seconds": spent}


def short_warmup(llm: LLM) -> None:
    """One short request (what a user's first call would be); graphs were captured at start-up."""
    vocab = llm.engine.vocab_size
    llm.generate([[(7 * i + 3) % vocab for i in range(16)]], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)


def default_config(config: EngineConfig) -> EngineConfig:
    """``LLM(model)``: the model section of ``config`` (path, dtype, load format) and nothing else."""
    return EngineConfig().evolve(model=attrs.asdict(config.model), backend={"name": config.backend.name})


def run(config: EngineConfig, options: SamplingBenchOptions, args: argparse.Namespace | None = None) -> BenchReport:
    """Run the benchmark, write its files, return the report."""
    env = environment(args)
    results: dict[str, Any] = {}
    tick = time.perf_counter()
    llm = LLM(config=config)
    startup = time.perf_counter() - tick
    capture = llm.get_stats()["graph_capture"]
    print(f"[start-up] {startup:.1f} s (graph capture {capture['seconds']:.1f} s, warm-up "
          f"{capture.get('warmup_seconds', 0.0):.1f} s)", flush=True)
    try:
        workload = random_workload(options.num_requests, options.input_len, options.output_len,
                                   llm.engine.vocab_size, options.seed)
        print(workload.describe(), flush=True)
        short_warmup(llm)
        first = timed_run(llm, workload, MIXES[PLAIN], options.temperature, "first run")
        for name in options.mixes:
            results[name] = timed_run(llm, workload, MIXES[name], options.temperature, name)
        setup = describe_engine(llm)
        setup["budgets"] = llm.engine.budgets.as_dict()
        setup["graph_capture"] = llm.get_stats()["graph_capture"]
        setup["startup_s"] = startup
        env["gpus"] = device_info(llm.engine.backend)
    finally:
        release_engine(llm)
    plain = results[PLAIN]["elapsed_s"]
    for result in results.values():
        result["ratio_to_plain"] = plain / result["elapsed_s"]
    extra = {"first run (one short warm-up) / second": {**first, "ratio_to_plain": plain / first["elapsed_s"]}}
    if options.compare_defaults:
        extra["defaults (LLM(model)) / tuned"] = _defaults_run(config, workload, options, plain, setup)
    setup.update(workload=workload.describe(), temperature=options.temperature, workload_params=workload.params)
    report = BenchReport("sampling", env, setup, {"mixes": results, "engine": extra}, _tables(results, extra),
                         [], _notes())
    write_report(report, options.output_dir, _figures(results, extra))
    return report


def _defaults_run(config: EngineConfig, workload: Workload, options: SamplingBenchOptions, plain: float,
                  setup: dict[str, Any]) -> dict[str, Any]:
    llm = LLM(config=default_config(config))
    try:
        short_warmup(llm)
        result = timed_run(llm, workload, MIXES[PLAIN], options.temperature, "defaults")
        setup["default_budgets"] = llm.engine.budgets.as_dict()
    finally:
        release_engine(llm)
    return {**result, "ratio_to_plain": plain / result["elapsed_s"]}


def _tables(results: dict[str, Any], extra: dict[str, Any]) -> list[Table]:
    mixes = Table("Sampling mixes (same engine, same workload)", ["mix", "elapsed s", "output tok/s", "/ plain"])
    for name, r in results.items():
        mixes.rows.append([name, r["elapsed_s"], r["output_tokens_per_s"], r["ratio_to_plain"]])
    engine = Table("Configuration and first run (plain sampling)", ["run", "elapsed s", "output tok/s", "ratio"])
    for name, r in extra.items():
        engine.rows.append([name, r["elapsed_s"], r["output_tokens_per_s"], r["ratio_to_plain"]])
    return [mixes, engine]


def _notes() -> list[str]:
    return [
        "ratio: the plain mix's elapsed time / this run's, same engine and workload, every request generating "
        "exactly its requested length (EOS ignored); 1.00 = as fast as temperature-only sampling",
        "first run: the tuned engine's first timed run after one 4-token request; its ratio is against the "
        "plain mix, i.e. the second run of the same workload",
        "every timed run starts from an empty prefix cache (LLM.reset_prefix_cache), so each prefills the whole "
        "workload (before 2026-12-06 later runs found earlier runs' prompts cached)",
        "defaults: a second engine built from the model alone (budgets derived from the device), one 4-token "
        "request, then the plain workload; its ratio is against the tuned engine's plain mix",
        "mix: request i takes plain / top_p=0.95,top_k=50 / repetition_penalty=1.1 / seed=i+logprobs=5 by i mod 4; "
        "seeded: seed=i",
    ]


def _figures(results: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    ratios = {name: r["ratio_to_plain"] for name, r in {**results, **extra}.items()}
    return {"ratios": panel_bars({"throughput / plain": ratios}, "Sampling parameters vs the plain path")}
