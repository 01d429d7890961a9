"""Scheduler budgets derived from the device when the config leaves them unset (vLLM's idea of
per-device-class defaults): a large GPU runs many sequences and long token batches per step, a small
one or the CPU fewer. Values set explicitly (config, environment, command line) always win."""

from __future__ import annotations

import logging

import attrs

from sagellm_core.backend import Backend
from sagellm_core.config import FALLBACK_MAX_NUM_BATCHED_TOKENS, FALLBACK_MAX_NUM_SEQS, EngineConfig

log = logging.getLogger("sagellm")
GIB = 1 << 30
MAX_GRAPH_BATCH = 512

# (minimum device memory in GiB, max_num_seqs, max_num_batched_tokens), largest first
GPU_CLASSES: tuple[tuple[int, int, int], ...] = ((70, 512, 16384), (30, 256, 8192), (12, 128, 4096), (0, 64, 2048))
CPU_BUDGETS = (FALLBACK_MAX_NUM_SEQS, FALLBACK_MAX_NUM_BATCHED_TOKENS)


@attrs.frozen
class Budgets:
    """The budgets an engine runs with and where each came from (``config`` or ``derived``)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_graph_batch_size: int
    source: dict[str, str]
    device_class: str

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def device_budgets(backend: Backend) -> tuple[int, int, str]:
    """(max_num_seqs, max_num_batched_tokens, a description of the device class) for ``backend``."""
    if backend.device_type == "cpu":
        return (*CPU_BUDGETS, "cpu")
    total = backend.memory_info()[1]
    for min_gib, seqs, tokens in GPU_CLASSES:
        if total >= min_gib * GIB:
            return seqs, tokens, f"{backend.device_type} with {total / GIB:.0f} GiB (class >= {min_gib} GiB)"
    raise AssertionError("the last class has no minimum")


def resolve_budgets(config: EngineConfig, backend: Backend) -> tuple[EngineConfig, Budgets]:
    """``config`` with every unset budget filled in from the device, and the report of them."""
    seqs, tokens, device_class = device_budgets(backend)
    scheduler, backend_config = config.scheduler, config.backend
    source = {"max_num_seqs": "config", "max_num_batched_tokens": "config", "max_graph_batch_size": "config"}
    if scheduler.max_num_seqs is None:
        source["max_num_seqs"] = "derived"
        scheduler = attrs.evolve(scheduler, max_num_seqs=seqs)
    if scheduler.max_num_batched_tokens is None:
        source["max_num_batched_tokens"] = "derived"
        scheduler = attrs.evolve(scheduler, max_num_batched_tokens=tokens)
    if backend_config.max_graph_batch_size is None:
        source["max_graph_batch_size"] = "derived"
        backend_config = attrs.evolve(backend_config,
                                      max_graph_batch_size=min(MAX_GRAPH_BATCH, scheduler.max_num_seqs or seqs))
    config = attrs.evolve(config, scheduler=scheduler, backend=backend_config)
    budgets = Budgets(int(config.scheduler.max_num_seqs or seqs),
                      int(config.scheduler.max_num_batched_tokens or tokens),
                      int(config.backend.max_graph_batch_size or MAX_GRAPH_BATCH), source, device_class)
    log.info("budgets for %s: max_num_seqs=%d (%s), max_num_batched_tokens=%d (%s), graph batch <= %d (%s)",
             device_class, budgets.max_num_seqs, source["max_num_seqs"], budgets.max_num_batched_tokens,
             source["max_num_batched_tokens"], budgets.max_graph_batch_size, source["max_graph_batch_size"])
    return config, budgets
