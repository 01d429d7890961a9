"""Starting the engine's processes: rank 0 joins (or creates) the process group and, when no launcher
started the others, spawns them; a worker rank builds its model and runner and serves steps."""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

import attrs
import torch
import torch.distributed as dist

from sagellm_core.parallel.distributed import ControlPlane, World, external_world, free_port, serve_steps
from sagellm_core.parallel.tensor_parallel import shard_model

log = logging.getLogger("sagellm")


@attrs.frozen
class Layout:
    """What each rank holds: ``tensor`` (a shard of every layer) or ``pd_split`` (rank 0 the prefill
    pool, rank 1 the decode pool)."""

    kind: str
    size: int


def layout_of(config: Any) -> Layout | None:
    """The distributed layout ``config.parallel`` asks for, or None for one process."""
    parallel = config.parallel
    if parallel.tensor_parallel_size > 1:
        return Layout("tensor", parallel.tensor_parallel_size)
    if parallel.pd_split:
        return Layout("pd_split", 2)
    return None


def rank_backend_config(config: Any, rank: int) -> Any:
    """Each rank drives the device ``backend.device_index + rank`` (all share the one CPU)."""
    return attrs.evolve(config.backend, device_index=config.backend.device_index + rank)


def join(config: Any, dist_backend: str, layout: Layout) -> tuple[World, ControlPlane]:
    """Rank 0's entry: the process group of ``layout.size`` ranks, spawning the workers if needed."""
    world = external_world()
    if world is not None:
        if world.size != layout.size:
            raise RuntimeError(f"the launcher started {world.size} processes; parallel settings need {layout.size}")
        if not dist.is_initialized():
            dist.init_process_group(dist_backend, init_method="env://", rank=world.rank, world_size=world.size)
        return world, ControlPlane()
    host = config.parallel.master_addr
    init_method = f"tcp://{host}:{config.parallel.master_port or free_port(host)}"
    context = multiprocessing.get_context("spawn")
    for rank in range(1, layout.size):
        context.Process(target=worker_main, args=(config.to_dict(), rank, layout, init_method), daemon=True,
                        name=f"sagellm-rank{rank}").start()
    dist.init_process_group(dist_backend, init_method=init_method, rank=0, world_size=layout.size)
    return World(0, layout.size, 0, external=False), ControlPlane()


def prepare_model(model: Any, rank: int, layout: Layout) -> Any:
    """Shard ``model`` for ``rank`` under tensor parallelism (the pd split keeps whole models)."""
    if layout.kind == "tensor":
        shard_model(model, rank, layout.size)
    return model


def worker_main(config_dict: dict[str, Any], rank: int, layout: Layout, init_method: str | None) -> None:
    """A worker rank (spawned, or started by a launcher): build, then serve steps until stopped."""
    from sagellm_core.config import EngineConfig

    config = EngineConfig.from_dict(config_dict)
    run_worker(config, rank, layout, init_method)


def run_worker(config: Any, rank: int, layout: Layout, init_method: str | None) -> None:
    from sagellm_core.backend_selection import create_backend, select_backend
    from sagellm_core.engine.builder import model_dtype
    from sagellm_core.models import loader
    from sagellm_core.models.runner import ModelRunner
    from sagellm_core.plugin_manager import create_plugin_manager
    from sagellm_core.quant import kv_cache_dtype, quantize_loaded_model

    plugins = create_plugin_manager()
    requested = None if config.backend.name == "auto" else config.backend.name
    backend = create_backend(select_backend(plugins, requested).spec, rank_backend_config(config, rank))
    if not dist.is_initialized():
        dist.init_process_group(backend.dist_backend, init_method=init_method or "env://", rank=rank,
                                world_size=layout.size)
    control = ControlPlane()
    try:
        dtype = model_dtype(config, backend)
        source = loader.resolve(config.model.path, config.model.gguf_file)
        model = prepare_model(loader.load_model(source, dtype, backend.device(), config.model.load_format,
                                                backend=backend), rank, layout)
        quantize_loaded_model(model, config.model, backend, dtype, source)
        init = control.receive()
        if init[0] == "stop":  # rank 0 failed to start
            return
        _, pool_blocks, max_model_len, graph_batch = init
        runner = ModelRunner(model, backend, config.kv_cache.block_size, pool_blocks, dtype,
                             max_model_len=max_model_len, graph_batch_size=graph_batch,
                             cache_dtype=kv_cache_dtype(config.kv_cache.dtype, dtype))
        serve_steps(runner, control, layout.kind)
    finally:
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        dist.destroy_process_group()


def local_pools(layout: Layout | None, pool_blocks: list[int], rank: int) -> list[int]:
    """The KV blocks ``rank`` allocates per pool: all of them under tensor parallelism (each rank
    its own heads), only its own pool under the prefill/decode split."""
    if layout is None or layout.kind == "tensor":
        return list(pool_blocks)
    return [blocks if pool == rank else 0 for pool, blocks in enumerate(pool_blocks)]


def attach_workers(runner: Any, control: ControlPlane, layout: Layout, pool_blocks: list[int],
                   max_model_len: int, graph_batch: int) -> Any:
    """Tell the workers how to build their runners; return rank 0's runner for ``layout``."""
    from sagellm_core.parallel.distributed import SplitPoolRunner, TensorParallelRunner

    control.send(("init", local_pools(layout, pool_blocks, 1), max_model_len, graph_batch))
    if layout.kind == "tensor":
        return TensorParallelRunner(runner, control)
    return SplitPoolRunner(runner, control)


def stop_workers(control: ControlPlane) -> None:
    """After a failed start-up on rank 0: let the workers exit."""
    try:
        control.send(("stop",))
    finally:
        dist.destroy_process_group()
