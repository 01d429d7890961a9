"""Hugging Face transformers as the peer, on the very model object sageLLM ran (same weights, dtype, device).

sageLLM's model runner switches the model's ``config._attn_implementation`` to its paged attention;
`sdpa_attention` switches it (and every sub-config) to ``"sdpa"`` while transformers runs and back
afterwards. Reusing the object, rather than loading a second copy, guarantees identical weights
(random ``dummy`` weights included) and needs no second copy of device memory; callers release the
sageLLM engine's KV cache first so transformers' own cache has the memory.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch

from sagellm_bench.stats import RequestTiming
from sagellm_bench.workloads import BenchRequest, Workload

PEER_ATTENTION = "sdpa"


def _configs(model: Any) -> list[Any]:
    """The model's config and every sub-module config carrying an attention implementation."""
    found = [model.config]
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and all(config is not c for c in found):
            found.append(config)
    return found


@contextlib.contextmanager
def sdpa_attention(model: Any, implementation: str = PEER_ATTENTION) -> Iterator[None]:
    """Run transformers' own attention inside the block; restore sageLLM's on exit."""
    saved = [(config, config._attn_implementation) for config in _configs(model)]
    try:
        for config, _ in saved:
            config._attn_implementation = implementation
        yield
    finally:
        for config, value in saved:  # top-level first: its setter recurses into sub-configs
            config._attn_implementation = value


def load_own(path: str | None, gguf_file: str | None, dtype: Any, device: Any) -> Any:
    """The model as a transformers user gets it: ``from_pretrained`` on the same checkpoint in
    ``dtype`` on ``device``, without sageLLM's quantized layers or fused modules (a GGUF comes
    de-quantized). Random-weight shapes (``load_format: dummy``) have no checkpoint to load."""
    from transformers import AutoModelForCausalLM

    from sagellm_core.models.loader import resolve

    source = resolve(path, gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), gguf_file=source.gguf_file, dtype=dtype,
                                                 device_map=str(device))
    return model.eval()


def pad_token_id(model: Any) -> int:
    """The generation config's pad id, else its EOS, else 0 (padding is masked out anyway)."""
    generation = getattr(model, "generation_config", None)
    for candidate in (getattr(generation, "pad_token_id", None), getattr(generation, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, (list, tuple)) and candidate:
            return int(candidate[0])
    return 0


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    """The same sampling as sageLLM's SamplingParams: greedy at 0, else plain temperature sampling."""
    if temperature == 0.0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}


def left_pad(batch: list[BenchRequest], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] padded on the left, and the matching attention mask."""
    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        ids[row, width - request.prompt_len:] = torch.tensor(request.prompt_token_ids)
        mask[row, width - request.prompt_len:] = 1
    return ids.to(device), mask.to(device)


def _generate(model: Any, batch: list[BenchRequest], new_tokens: int, temperature: float,
              **extra: Any) -> torch.Tensor:
    """`model.generate` on a left-padded batch; EOS cannot end it early (``min_new_tokens``)."""
    pad = pad_token_id(model)
    ids, mask = left_pad(batch, pad, model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=pad, repetition_penalty=1.0, **sampling_kwargs(temperature), **extra)
    return out[:, ids.shape[1]:]


def warmup(model: Any, vocab_size: int) -> None:
    """One short generate so first-call costs stay out of the timings."""
    request = BenchRequest([(7 * i + 3) % vocab_size for i in range(16)], 4)
    with sdpa_attention(model), torch.inference_mode():
        _generate(model, [request], 4, 0.0)


def run_static(model: Any, workload: Workload, batch_size: int, temperature: float,
               synchronize: Callable[[], None]) -> dict[str, Any]:
    """Static batching in workload order: each batch generates its longest requested output.

    ``synchronize`` waits for the device (the engine backend's ``synchronize``: same device, same weights).

    Only each request's requested tokens count as useful output; the rest of a batch's steps is
    the cost of static batching and is reported as ``wasted_output_tokens``.
    """
    from tqdm import tqdm

    requests = workload.requests
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    useful = computed = 0
    with sdpa_attention(model), torch.inference_mode():
        synchronize()
        start = time.perf_counter()
        for batch in tqdm(batches, desc=f"HF generate (batch {batch_size})", unit="batch"):
            new_tokens = max(r.output_len for r in batch)
            generated = _generate(model, batch, new_tokens, temperature).shape[1]
            useful += sum(min(r.output_len, generated) for r in batch)
            computed += generated * len(batch)
        synchronize()
        elapsed = time.perf_counter() - start
    prompt = workload.num_prompt_tokens
    return {
        "mode": "static", "batch_size": batch_size, "attention": PEER_ATTENTION, "elapsed_s": elapsed,
        "completed": len(requests), "prompt_tokens": prompt, "output_tokens": useful,
        "wasted_output_tokens": computed - useful,
        "requests_per_s": len(requests) / elapsed, "output_tokens_per_s": useful / elapsed,
        "total_tokens_per_s": (prompt + useful) / elapsed,
    }


def continuous_batching_available(model: Any) -> bool:
    """transformers 5.x continuous batching (``generate_batch``) is there to call."""
    return hasattr(model, "generate_batch") and hasattr(model, "continuous_batching_context_manager")


def run_continuous(model: Any, workload: Workload, temperature: float, synchronize: Callable[[], None]
                   ) -> dict[str, Any]:
    """transformers' continuous batching manager, one request per workload entry with its own length."""
    from tqdm import tqdm
    from transformers import GenerationConfig

    requests = workload.requests
    config = GenerationConfig(max_new_tokens=max(r.output_len for r in requests), eos_token_id=-1,
                              pad_token_id=pad_token_id(model), **sampling_kwargs(temperature))
    lengths: dict[str, int] = {}
    errors: list[str] = []
    with sdpa_attention(model), torch.inference_mode():
        with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30,
                                                       workload_hints=_workload_hints(workload)) as manager:
            attention = str(model.config._attn_implementation)  # transformers may switch to flash here
            synchronize()
            start = time.perf_counter()
            for index, request in enumerate(requests):
                manager.add_request(request.prompt_token_ids, request_id=f"bench-{index}",
                                    max_new_tokens=request.output_len, eos_token_id=-1)
            with tqdm(total=len(requests), desc="HF continuous batching", unit="req") as bar:
                while len(lengths) + len(errors) < len(requests):
                    result = manager.get_result(timeout=1)
                    if result is None:
                        if not manager.is_running():
                            errors.append("generation thread stopped")
                            break
                        continue
                    if result.is_finished():
                        if result.error is not None:
                            errors.append(str(result.error))
                        else:
                            lengths[result.request_id] = len(result.generated_tokens)
                        bar.update(1)
            synchronize()
            elapsed = time.perf_counter() - start
    useful = sum(min(r.output_len, lengths.get(f"bench-{i}", 0)) for i, r in enumerate(requests))
    prompt = sum(r.prompt_len for i, r in enumerate(requests) if f"bench-{i}" in lengths)
    return {
        "mode": "continuous", "attention": attention, "elapsed_s": elapsed, "completed": len(lengths),
        "failed": len(requests) - len(lengths), "errors": errors[:5], "prompt_tokens": prompt,
        "output_tokens": useful, "requests_per_s": len(lengths) / elapsed,
        "output_tokens_per_s": useful / elapsed, "total_tokens_per_s": (prompt + useful) / elapsed,
    }


def _workload_hints(workload: Workload) -> Any:
    """Sizing hints for transformers' KV cache (present in 5.17+; None where the class moved)."""
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(max_prompt_length=max(r.prompt_len for r in workload.requests),
                         max_generated_length=max(r.output_len for r in workload.requests),
                         num_requests=len(workload.requests))


def _timing_streamer() -> Any:
    """A transformers streamer that only records when each new token reached Python."""
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self._prompt_seen:  # generate() first passes the prompt
                self._prompt_seen = True
                return
            self.times.append(time.monotonic())

        def end(self) -> None:
            pass

    return TimingStreamer()


def run_latency(model: Any, request: BenchRequest, temperature: float = 0.0) -> RequestTiming:
    """Batch-1 `generate` with per-token timestamps (TTFT from the call, TPOT over the decode)."""
    streamer = _timing_streamer()
    with sdpa_attention(model), torch.inference_mode():
        start = time.monotonic()
        generated = _generate(model, [request], request.output_len, temperature, streamer=streamer)
    times = tuple(streamer.times)
    return RequestTiming(arrival=start, first_token=times[0] if times else None,
                         finished=times[-1] if times else time.monotonic(), prompt_len=request.prompt_len,
                         output_len=int(generated.shape[1]), token_times=times)
