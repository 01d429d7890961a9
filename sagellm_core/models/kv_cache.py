"""The KV cache's device memory: one tensor per pool, block copies between pools, release."""

from __future__ import annotations

from typing import Any

import torch

from sagellm_core.plan import BlockTransfer


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_shape(model: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder model."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_block(model: Any, block_size: int, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = kv_shape(model)
    return layers * 2 * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class KVCache:
    """Per-pool tensors ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``,
    allocated by the backend (the block bookkeeping lives in `sagellm_core.kv.manager`)."""

    def __init__(self, backend: Any, model: Any, pool_blocks: list[int], block_size: int,
                 dtype: torch.dtype) -> None:
        layers, kv_heads, head_dim = kv_shape(model)
        self.device = backend.device()
        self.block_size = block_size
        self.pools: list[torch.Tensor] = [
            backend.allocate_kv_cache(layers, blocks, block_size, kv_heads, head_dim, dtype)
            for blocks in pool_blocks
        ]

    def pool(self, index: int) -> torch.Tensor:
        return self.pools[index]

    def copy_blocks(self, transfers: list[BlockTransfer]) -> None:
        """Queue the copies (all layers, K and V) of each transfer's blocks."""
        for t in transfers:
            src = torch.tensor(t.src_blocks, device=self.device)
            dst = torch.tensor(t.dst_blocks[: len(t.src_blocks)], device=self.device)
            self.pools[t.dst_pool][:, :, dst] = self.pools[t.src_pool][:, :, src]

    def release(self) -> None:
        """Drop the tensors (device memory); nothing can run on this cache afterwards."""
        self.pools = []
