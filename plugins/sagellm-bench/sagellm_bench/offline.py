"""Running sageLLM in-process over a workload: engine sessions, warm-up, timed runs."""

from __future__ import annotations

import contextlib
import gc
import math
import time
from typing import Any, Iterator

import attrs

from sagellm_bench.stats import RequestTiming
from sagellm_bench.workloads import BenchRequest, Workload
from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM
from sagellm_core.outputs import RequestOutput
from sagellm_core.sampling_params import SamplingParams


def free_device_memory() -> None:
    """Collect garbage and return the accelerator's cached blocks (so the next engine or peer gets the memory)."""
    import torch

    gc.collect()
    if torch.accelerator.is_available():
        torch.accelerator.empty_cache()


@contextlib.contextmanager
def engine_session(config: EngineConfig) -> Iterator[LLM]:
    """An `LLM` that is shut down on exit, its device memory freed before the caller moves on."""
    llm = LLM(config=config)
    try:
        yield llm
    finally:
        release_engine(llm)


def release_engine(llm: LLM) -> Any:
    """Shut the engine down and free its KV cache (and any captured graphs); return the model object.

    NOTE: a shut-down `LLM` cannot run again, so dropping its engine loses nothing; it matters on GPUs,
    where the KV pool takes most of the free memory that the next engine or the HF peer needs.
    """
    model = llm.engine.model
    llm.shutdown()
    free_device_memory()
    return model


def params_for(request: BenchRequest, temperature: float, seed: int | None = None) -> SamplingParams:
    """Exactly ``output_len`` tokens: EOS ignored, ``max_tokens`` = the requested length."""
    return SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=temperature, seed=seed)


def warmup(llm: LLM, vocab_size: int, prompt_len: int = 16, output_len: int = 4) -> None:
    """Keep one-time costs (kernel compilation, allocator growth, graph capture) out of the timings.

    One short request; where the runner captures decode graphs per batch-size bucket (lazily, on
    first use), also ``max_batch`` requests with output lengths 1..max_batch, whose decode batch
    shrinks by one per step and so visits every bucket.
    """
    prompt = [(7 * i + 3) % vocab_size for i in range(prompt_len)]
    llm.generate([prompt], SamplingParams(max_tokens=output_len, ignore_eos=True), use_tqdm=False)
    graphs = getattr(llm.engine.runner, "graphs", None)
    max_batch = int(getattr(graphs, "max_batch", 0) or 0)
    if max_batch > 1:
        prompts = [[(i + j) % vocab_size for j in range(4)] for i in range(max_batch)]
        params = [SamplingParams(max_tokens=n + 1, ignore_eos=True) for n in range(max_batch)]
        llm.generate(prompts, params, use_tqdm=False)


def timing_from_output(output: RequestOutput, arrival: float | None = None,
                       token_times: tuple[float, ...] = ()) -> RequestTiming:
    """A `RequestTiming` from the engine's per-request metrics (``time.monotonic`` clock)."""
    metrics = output.metrics
    assert metrics is not None
    finished = metrics.finished_time or metrics.last_token_time or metrics.arrival_time
    return RequestTiming(
        arrival=metrics.arrival_time if arrival is None else arrival,
        first_token=metrics.first_token_time, finished=finished,
        prompt_len=len(output.prompt_token_ids), output_len=len(output.outputs[0].token_ids),
        token_times=token_times, cached_tokens=metrics.num_cached_tokens,
        ok=output.outputs[0].finish_reason in ("length", "stop"),
    )


def run_offline(llm: LLM, workload: Workload, temperature: float, desc: str = "sageLLM"
                ) -> tuple[list[RequestTiming], float]:
    """All requests at once through `LLM.generate` (its tqdm bar); returns timings and wall seconds."""
    prompts = [r.prompt_token_ids for r in workload.requests]
    params = [params_for(r, temperature) for r in workload.requests]
    print(f"[{desc}] {len(prompts)} requests", flush=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    return [timing_from_output(o) for o in outputs], elapsed


def run_with_arrivals(llm: LLM, workload: Workload, offsets: list[float], temperature: float,
                      desc: str = "sageLLM") -> tuple[list[RequestTiming], float]:
    """Submit each request at its arrival offset; TTFT counts from the submit time."""
    if all(o == 0.0 for o in offsets):
        return run_offline(llm, workload, temperature, desc)
    from tqdm import tqdm

    start = time.monotonic()
    streams, submitted = [], []
    bar = tqdm(total=len(offsets), desc=desc, unit="req")
    for request, offset in zip(workload.requests, offsets):
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        submitted.append(time.monotonic())
        streams.append(llm.submit(request.prompt_token_ids, params_for(request, temperature)))
    finals = []
    for stream in streams:
        for _ in stream:
            pass
        finals.append(stream.final)
        bar.update(1)
    bar.close()
    elapsed = max(t.metrics.finished_time or start for t in finals if t is not None) - start
    timings = [timing_from_output(f, arrival) for f, arrival in zip(finals, submitted) if f is not None]
    return timings, elapsed


def stream_one(llm: LLM, request: BenchRequest, temperature: float = 0.0) -> RequestTiming:
    """Stream one request; token times are when each token reached the caller."""
    submitted = time.monotonic()
    times: list[float] = []
    final = None
    for output in llm.generate_stream(request.prompt_token_ids, params_for(request, temperature)):
        now = time.monotonic()
        times.extend([now] * len(output.outputs[0].delta_token_ids))
        final = output
    assert final is not None
    timing = timing_from_output(final, submitted, tuple(times))
    if not times:
        return timing
    return attrs.evolve(timing, first_token=times[0], finished=times[-1])


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def describe_engine(llm: LLM) -> dict[str, Any]:
    """Model, backend, device, dtype and the engine settings a reader needs to reproduce a run."""
    engine, config = llm.engine, llm.engine.config  # budgets as resolved from the device
    return {
        "model": engine.model_name, "model_path": config.model.path or "default",
        "load_format": config.model.load_format, "architecture": type(engine.model).__name__,
        "backend": engine.backend.name, "device": str(engine.backend.device()),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention": engine.backend.describe().get("attention", "reference"),
        "scheduler": config.scheduler.name, "scheduler_options": dict(config.scheduler.options),
        "max_num_seqs": config.scheduler.max_num_seqs,
        "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "kv_policy": config.kv_cache.policy, "kv_block_size": config.kv_cache.block_size,
        "kv_blocks": [pool.num_blocks for pool in engine.kv_pools],
    }
