"""Building an engine's parts from its config: backend, tokenizer and model, scheduler, KV pools
(sized from the config or from device memory), context length, runner, sampler, metric sinks."""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

from sagellm_core.backend import Backend
from sagellm_core.backend_selection import BackendChoice, create_backend, select_backend
from sagellm_core.config import EngineConfig
from sagellm_core.errors import ConfigError
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.models import loader
from sagellm_core.models.kv_cache import kv_bytes_per_block, text_config
from sagellm_core.models.runner import ModelRunner
from sagellm_core.plugin_manager import SageLLMPluginManager
from sagellm_core.plugin_selection import validate_plugin_selection
from sagellm_core.sampler import Sampler
from sagellm_core.schedulers.base import Scheduler

log = logging.getLogger("sagellm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@attrs.define
class EngineParts:
    backend_choice: BackendChoice
    backend: Backend
    dtype: torch.dtype
    model_name: str
    tokenizer: Any
    model: Any
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
    plugins.configure(config)

    dtype = backend.default_dtype() if config.model.dtype == "auto" else DTYPES[config.model.dtype]
    source = loader.resolve(config.model.path, config.model.gguf_file)
    tokenizer = loader.load_tokenizer(source, config.model.tokenizer)
    model = loader.load_model(source, dtype, backend.device(), config.model.load_format, backend=backend)
    model_config = text_config(model)

    scheduler = selection.create_scheduler(config.scheduler)
    pool_blocks = pool_sizes(config, backend, model, dtype, scheduler)
    block_size = config.kv_cache.block_size
    kv_pools = [KVCacheManager(n, block_size, selection.create_kv_policy()) for n in pool_blocks]
    scheduler.bind(kv_pools)
    max_model_len = context_length(config, getattr(model_config, "max_position_embeddings", 2048),
                                   min(pool_blocks) * block_size, pool_blocks)
    runner = ModelRunner(model, backend, block_size, pool_blocks, dtype, max_model_len=max_model_len,
                         graph_batch_size=graph_batch_size(config, model_config))
    mode = config.scheduler.async_scheduling
    return EngineParts(
        backend_choice=choice, backend=backend, dtype=dtype, model_name=source.name, tokenizer=tokenizer,
        model=model, vocab_size=model_config.vocab_size, max_model_len=max_model_len,
        eos_token_ids=eos_ids(model, tokenizer), scheduler=scheduler, kv_pools=kv_pools, runner=runner,
        sampler=Sampler(config.model.seed, fused=backend.fused_sampler()),
        metric_sinks=selection.create_metric_sinks(config.metrics),
        async_scheduling=mode == "on" or (mode == "auto" and backend.async_output),
    )


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
    return min(config.backend.max_graph_batch_size, config.scheduler.max_num_seqs)


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
