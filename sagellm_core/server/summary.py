"""The start-up summary the server logs once the model is loaded."""

from __future__ import annotations

from typing import Any

from sagellm_core.models.runner import kv_bytes_per_block


def startup_summary(llm: Any, served_model_name: str, address: str | None) -> str:
    """One line: model, dtype, backend, KV pool (blocks, tokens, bytes), max model length, address."""
    engine = llm.engine
    block_size = engine.config.kv_cache.block_size
    blocks = sum(pool.num_blocks for pool in engine.kv_pools)
    kv_bytes = blocks * kv_bytes_per_block(engine.model, block_size, engine.dtype)
    dtype = str(engine.dtype).removeprefix("torch.")
    where = f" at {address}" if address else ""
    return (f"serving {engine.model_name!r} as {served_model_name!r}{where}: dtype {dtype}, backend "
            f"{engine.backend_choice.spec.name}, KV cache {blocks} blocks x {block_size} tokens "
            f"({blocks * block_size} tokens, {kv_bytes / 2**20:.1f} MiB) in {len(engine.kv_pools)} pool(s), "
            f"max model length {engine.max_model_len}, scheduler {engine.config.scheduler.name}")
