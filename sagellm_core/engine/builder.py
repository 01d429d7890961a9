"""Building an engine's parts from its config: backend, tokenizer and model, scheduler, KV pools
(sized from the config or from device memory), context length, runner, sampler, metric sinks."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import attrs
import torch

from sagellm_core.backend import Backend
from sagellm_core.backend_selection import BackendChoice, create_backend, select_backend
from sagellm_core.config import EngineConfig
from sagellm_core.engine.budgets import Budgets, resolve_budgets
from sagellm_core.errors import ConfigError
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.models import loader
from sagellm_core.kv.tiers.base import TierContext
from sagellm_core.kv.tiers.fingerprint import kv_fingerprint, weights_signature
from sagellm_core.kv.tiers.gate import LoadGate
from sagellm_core.kv.tiers.store import TierStore
from sagellm_core.models.kv_cache import kv_bytes_per_block, kv_shape, text_config
from sagellm_core.models.runner import ModelRunner
from sagellm_core.parallel.distributed import external_world
from sagellm_core.parallel.launch import (Layout, attach_workers, join, layout_of, local_pools, prepare_model,
                                          run_worker, stop_workers)
from sagellm_core.plugin_manager import SageLLMPluginManager
from sagellm_core.quant import QuantizationReport, kv_cache_dtype, quantize_loaded_model
from sagellm_core.plugin_selection import PluginSelection, validate_plugin_selection
from sagellm_core.sampling import Sampler
from sagellm_core.sampling.warm_up import warm_up_bitmask, warm_up_sampler
from sagellm_core.schedulers.base import Scheduler

log = logging.getLogger("sagellm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@attrs.define
class EngineParts:
    config: EngineConfig  # with the budgets resolved
    budgets: Budgets
    graph_capture_seconds: float
    backend_choice: BackendChoice
    backend: Backend
    dtype: torch.dtype
    model_name: str
    tokenizer: Any
    model: Any
    quantization: QuantizationReport
    kv_dtype: torch.dtype
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    scheduler: Scheduler
    kv_pools: list[KVCacheManager]
    runner: ModelRunner
    sampler: Sampler
    metric_sinks: dict[str, Any]
    async_scheduling: bool


def build_engine(config: EngineConfig, plugins: SageLLMPluginManager) -> EngineParts:
    """Every part, in an order that fails fast: plugin names and options before the model loads."""
    selection = validate_plugin_selection(config, plugins)  # names and options, before any loading
    requested = None if config.backend.name == "auto" else config.backend.name
    choice = select_backend(plugins, requested)
    backend = create_backend(choice.spec, config.backend)
    config, budgets = resolve_budgets(config, backend)
    plugins.configure(config)
    scheduler = selection.create_scheduler(config.scheduler)
    layout = distributed_layout(config, scheduler)
    control = join(config, backend.dist_backend, layout)[1] if layout is not None else None
    try:
        dtype = model_dtype(config, backend)
        source = loader.resolve(config.model.path, config.model.gguf_file)
        tokenizer = loader.load_tokenizer(source, config.model.tokenizer)
        load_start = time.perf_counter()
        model = loader.load_model(source, dtype, backend.device(), config.model.load_format, backend=backend)
        log.info("loaded %s (%s weights) in %.1f s", source.directory.name, config.model.load_format,
                 time.perf_counter() - load_start)
        if layout is not None:
            prepare_model(model, 0, layout)
        quantization = quantize_loaded_model(model, config.model, backend, dtype, source)
        kv_dtype = kv_cache_dtype(config.kv_cache.dtype, dtype)
        model_config = text_config(model)

        pool_blocks = pool_sizes(config, backend, model, kv_dtype, scheduler)
        block_size = config.kv_cache.block_size
        tiers = tier_store(config, selection, backend, model, kv_dtype, dtype, source, quantization.method)
        kv_pools = [KVCacheManager(n, block_size, selection.create_kv_policy(), tiers if i == 0 else None)
                    for i, n in enumerate(pool_blocks)]
        scheduler.bind(kv_pools)
        max_model_len = context_length(config, getattr(model_config, "max_position_embeddings", 2048),
                                       min(pool_blocks) * block_size, pool_blocks)
        graph_batch = graph_batch_size(config, model_config)
        runner = ModelRunner(model, backend, block_size, local_pools(layout, pool_blocks, 0), dtype,
                             max_model_len=max_model_len, graph_batch_size=graph_batch, cache_dtype=kv_dtype)
        capture_seconds = 0.0
        if tiers is not None:
            tiers.bind(runner.kv_caches[0])
        if control is not None and layout is not None:
            runner = attach_workers(runner, control, layout, pool_blocks, max_model_len, graph_batch)
        elif runner.captures_graphs:
            runner.warm_up_prefill()
            capture_seconds = runner.capture_graphs(progress=sys.stderr.isatty())
            log.info("captured %d decode graphs (batch <= %d) in %.1f s", len(runner.graphs.graphs),  # type: ignore[union-attr]
                     graph_batch, capture_seconds)
    except BaseException:
        if control is not None:
            stop_workers(control)
        raise
    mode = config.scheduler.async_scheduling
    sampler = Sampler(config.model.seed, fused=backend.fused_sampler(), filtered=backend.fused_filtered_sampler(),
                      fused_logprobs=backend.fused_logprobs())
    if sampler.compiles_kernels:
        log.info("sampling kernels warmed up in %.1f s",
                 warm_up_sampler(sampler, model_config.vocab_size, backend.device()))
    bitmask = backend.bitmask_op()
    if bitmask is not None:
        warm_up_bitmask(bitmask, model_config.vocab_size, backend.device())
    return EngineParts(
        config=config, budgets=budgets, graph_capture_seconds=capture_seconds, backend_choice=choice, backend=backend, dtype=dtype, model_name=source.name, tokenizer=tokenizer,
        model=model, quantization=quantization, kv_dtype=kv_dtype, vocab_size=model_config.vocab_size, max_model_len=max_model_len,
        eos_token_ids=eos_ids(model, tokenizer), scheduler=scheduler, kv_pools=kv_pools, runner=runner,
        sampler=sampler,
        metric_sinks=selection.create_metric_sinks(config.metrics),
        async_scheduling=layout is None and (mode == "on" or (mode == "auto" and backend.async_output)),
    )


def tier_store(config: EngineConfig, selection: PluginSelection, backend: Backend, model: Any,
               kv_dtype: torch.dtype, dtype: torch.dtype, source: loader.ModelSource,
               quantization: str) -> TierStore | None:
    """The tiers under the first KV pool (None when ``kv_tiers`` names none)."""
    if not selection.kv_tiers:
        return None
    layers, kv_heads, head_dim = kv_shape(model)
    block_size = config.kv_cache.block_size
    element = torch.tensor([], dtype=kv_dtype).element_size()
    weights = weights_signature(source.gguf_path or source.directory)
    fingerprint = kv_fingerprint(weights, model=source.name, load_format=config.model.load_format,
                                 seed=config.model.seed if config.model.load_format == "dummy" else None,
                                 dtype=dtype, kv_dtype=kv_dtype, quantization=quantization, block_size=block_size,
                                 num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)
    context = TierContext((layers, 2, block_size, kv_heads, head_dim * element), backend.device(), fingerprint,
                          config.kv_tiers)
    tiers = selection.create_kv_tiers(context)
    log.info("KV tiers under the device pool: %s (fingerprint %s)", ", ".join(t.name for t in tiers), fingerprint)
    return TierStore(tiers, backend.device(), config.kv_tiers.write_mode, LoadGate(enabled=config.kv_tiers.load_gate))


def model_dtype(config: EngineConfig, backend: Backend) -> torch.dtype:
    return backend.default_dtype() if config.model.dtype == "auto" else DTYPES[config.model.dtype]


def distributed_layout(config: EngineConfig, scheduler: Scheduler) -> Layout | None:
    """The multi-process layout ``config.parallel`` asks for (checked against the scheduler). Under
    a launcher such as torchrun, a rank above 0 serves steps here and exits when rank 0 stops."""
    layout = layout_of(config)
    if layout is None:
        return None
    if layout.kind == "pd_split" and scheduler.num_kv_pools != 2:
        raise ConfigError("parallel.pd_split: needs a scheduler with a separate decode pool "
                          "(scheduler: {name: pd, options: {mode: strict}})")
    world = external_world()
    if world is not None and world.rank > 0:
        run_worker(config, world.rank, layout, None)
        os._exit(0)
    return layout


EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def graph_batch_size(config: EngineConfig, model_config: Any) -> int:
    """Decode steps of up to this many sequences replay captured device graphs (0: none). The
    mixture-of-experts layers of transformers route tokens with host-side index work that a graph
    cannot capture, so those models decode eagerly."""
    if not config.backend.cuda_graphs:
        return 0
    if any(getattr(model_config, name, None) for name in EXPERT_COUNT_FIELDS):
        log.info("mixture-of-experts model: decode steps run eagerly (no device graphs)")
        return 0
    return min(config.backend.max_graph_batch_size or 0, config.scheduler.max_num_seqs or 0)


def pool_sizes(config: EngineConfig, backend: Backend, model: Any, dtype: torch.dtype,
               scheduler: Scheduler) -> list[int]:
    """Blocks per KV pool: ``kv_cache.num_blocks`` or what the memory budget holds, split by the
    scheduler's fractions."""
    kv = config.kv_cache
    total = kv.num_blocks
    if total is None:
        per_block = kv_bytes_per_block(model, kv.block_size, dtype)
        if backend.device_type == "cpu":
            budget = kv.cpu_memory_bytes
        else:
            free, device_total = backend.memory_info()
            budget = int(free - device_total * (1.0 - kv.memory_utilization))
        total = max(budget // per_block, 2 * scheduler.num_kv_pools)
    return [max(1, int(total * f)) for f in scheduler.kv_pool_fractions()]


def context_length(config: EngineConfig, model_max: int, pool_tokens: int, pool_blocks: list[int]) -> int:
    """``model.max_model_len`` if set (refused when the smallest KV pool cannot hold it: a request
    of that length could never run), else the model's own limit capped at what the pool holds."""
    requested = config.model.max_model_len
    if requested is not None:
        if requested > pool_tokens:
            raise ConfigError(
                f"model.max_model_len: {requested} tokens do not fit the KV cache, which holds "
                f"{pool_tokens} tokens per sequence ({min(pool_blocks)} blocks of {config.kv_cache.block_size}"
                f"{' in the smallest pool' if len(pool_blocks) > 1 else ''}); lower max_model_len or "
                f"raise kv_cache.num_blocks / memory")
        return requested
    if pool_tokens < model_max:
        log.info("context capped at %d tokens (KV pool) instead of the model's %d", pool_tokens, model_max)
    return min(model_max, pool_tokens)


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return frozenset(ids)
