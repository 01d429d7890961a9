"""Hardware floors measured in the same run: matmul FLOP/s and copy bandwidth, and what they imply.

- compute floor of a workload: its matmul FLOPs over the measured FLOP/s (the time a perfect
  engine would need if every token's matmuls ran at large-matmul speed);
- weight-read floor of one decode step at batch 1: the bytes of every weight matrix the step reads
  over the measured copy bandwidth, as stored: a quantized layer counts its codes and scales (int8,
  packed int4, FP8), not the shape-only ``weight`` it shows to other code.

Both ignore attention FLOPs/bytes (small at the benchmark lengths). Timings
wait for the device through the engine's backend (``Backend.synchronize``).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import attrs
import torch

from sagellm_core.backend import Backend


@attrs.frozen
class ParamCounts:
    """Parameters by role (a quantized layer counts the elements of the matrix it stands for).
    ``lm_head`` is counted even when tied to the embedding (it is read twice). ``decode_bytes``: the
    bytes of weights one batch-1 decode step reads, as stored (`stored_decode_bytes`)."""

    total: int
    embedding: int
    lm_head: int
    body: int
    element_size: int
    tied: bool
    decode_bytes: int


def param_counts(model: Any) -> ParamCounts:
    """Split a causal LM's parameters into embedding, LM head and the decoder body."""
    embedding = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = head_module.weight if head_module is not None else embedding
    tied = head is embedding
    # parameters() yields a tied tensor once; quantized layers hold buffers and a shape-only weight
    total = sum(p.numel() for p in model.parameters()) + sum(m.weight.numel() for m in _quantized(model))
    body = total - embedding.numel() - (0 if tied else head.numel())
    return ParamCounts(total=total, embedding=embedding.numel(), lm_head=head.numel(), body=body,
                       element_size=embedding.element_size(), tied=tied, decode_bytes=stored_decode_bytes(model))


def _quantized(model: Any) -> list[torch.nn.Module]:
    """Modules whose ``weight`` stands for data held elsewhere (a meta tensor: quantized layers)."""
    return [m for m in model.modules() if isinstance(getattr(type(m), "weight", None), property) and _is_meta(m.weight)]


def _is_meta(tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.device.type == "meta"


def _batch_rows_copies(model: Any) -> set[int]:
    """Ids of the de-quantized weight copies (``dense``) of the quantized layers (`weight_bytes`)."""
    return {id(module.dense) for module in model.modules()
            if callable(getattr(module, "weight_bytes", None)) and getattr(module, "dense", None) is not None}


def stored_decode_bytes(model: Any) -> int:
    """Bytes of weights a batch-1 decode step reads, as stored: every parameter and buffer of the
    model (a quantized layer's codes and scales; rotary tables and meta tensors aside) except the
    embedding table, of which one row is read; a tied LM head reads the whole table. The bf16 copies
    the CPU's quantized layers keep for steps of many rows (their ``dense`` buffers) are not read."""
    embedding = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    tied = head_module is None or head_module.weight is embedding
    total = (embedding.numel() if tied else embedding.shape[-1]) * embedding.element_size()
    seen = {id(embedding)} | _batch_rows_copies(model)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or _is_meta(tensor) or "rotary" in name or "inv_freq" in name:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


def _time_op(op: Callable[[], Any], synchronize: Callable[[], None], min_time: float, trials: int = 5,
             warmup: int = 2) -> float:
    """Best seconds per call of ``op`` over ``trials`` trials of ``min_time / trials`` seconds each.

    NOTE: the best trial, not the mean: a floor is the hardware's capability, and on a shared machine
    the other trials include other processes' interference.
    """
    for _ in range(warmup):
        op()
    synchronize()
    best = float("inf")
    for _ in range(trials):
        calls, start = 0, time.perf_counter()
        while True:
            op()
            calls += 1
            synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= min_time / trials:
                break
        best = min(best, elapsed / calls)
    return best


def measure_matmul_flops(backend: Backend, dtype: torch.dtype, size: int | None = None, min_time: float = 1.0
                         ) -> dict[str, Any]:
    """FLOP/s of a square ``size`` x ``size`` matmul (8192 on accelerators, 1024 on CPUs) in ``dtype``."""
    device, synchronize = backend.device(), backend.synchronize
    size = size or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    with torch.inference_mode():
        seconds = _time_op(lambda: torch.matmul(a, b), synchronize, min_time)
    del a, b
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "flops_per_s": 2.0 * size**3 / seconds}


def measure_bandwidth(backend: Backend, num_bytes: int | None = None, min_time: float = 1.0) -> dict[str, Any]:
    """Bytes/s of a large tensor copy (read + write counted), 1 GiB on accelerators and 256 MiB on CPUs."""
    device, synchronize = backend.device(), backend.synchronize
    num_bytes = num_bytes or ((256 << 20) if device.type == "cpu" else (1 << 30))
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _time_op(lambda: dst.copy_(src), synchronize, min_time)
    del src, dst
    return {"bytes": num_bytes, "seconds": seconds, "bytes_per_s": 2.0 * num_bytes / seconds}


def measure_read_bandwidth(backend: Backend, num_bytes: int | None = None, min_time: float = 1.0
                           ) -> dict[str, Any]:
    """Bytes/s of reading a large tensor once (a sum over it; only the read is counted)."""
    device, synchronize = backend.device(), backend.synchronize
    num_bytes = num_bytes or ((256 << 20) if device.type == "cpu" else (1 << 30))
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    seconds = _time_op(lambda: src.sum(), synchronize, min_time)
    del src
    return {"bytes": num_bytes, "seconds": seconds, "bytes_per_s": num_bytes / seconds}


def workload_flops(params: ParamCounts, forward_tokens: int, sampled_tokens: int) -> float:
    """Matmul FLOPs: 2 x body params per token through the model, 2 x LM head per sampled token."""
    return 2.0 * params.body * forward_tokens + 2.0 * params.lm_head * sampled_tokens


def compute_floor(params: ParamCounts, forward_tokens: int, sampled_tokens: int, flops_per_s: float,
                  elapsed_s: float) -> dict[str, Any]:
    """The workload's compute floor and the fraction of it an engine achieved in ``elapsed_s``."""
    flops = workload_flops(params, forward_tokens, sampled_tokens)
    floor = flops / flops_per_s
    return {"flops": flops, "floor_s": floor, "fraction_achieved": floor / elapsed_s if elapsed_s else 0.0,
            "simple_2PT_floor_s": 2.0 * params.total * forward_tokens / flops_per_s}


def weight_read_floor(params: ParamCounts, bytes_per_s: float, tpot_s: float) -> dict[str, Any]:
    """Per-token weight-read floor at batch 1 and how far the measured TPOT is above it."""
    floor = params.decode_bytes / bytes_per_s
    return {"bytes_per_token": params.decode_bytes, "floor_s": floor,
            "tpot_over_floor": tpot_s / floor if floor else 0.0}
