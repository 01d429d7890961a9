"""Registers sageLLM's paged attention as a transformers attention implementation.

Every decoder model in transformers calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with (module, query, key, value, mask, scaling=..., **kwargs). The model runner flattens the whole
step into one sequence of T tokens (batch 1) and passes a `StepContext` as the ``sagellm_step``
keyword, which transformers forwards to this function unchanged.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from sagellm_core.attention.metadata import AttentionMetadata

ATTN_IMPLEMENTATION = "sagellm_paged"


@attrs.define
class StepContext:
    """What the attention function needs for one forward pass."""

    meta: AttentionMetadata
    kv_cache: torch.Tensor  # [num_layers, 2, num_blocks, block_size, Hkv, D]
    op: Any


def sagellm_paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    step: StepContext = kwargs["sagellm_step"]
    layer_cache = step.kv_cache[module.layer_idx]
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    out = step.op(q, k, v, layer_cache[0], layer_cache[1], step.meta, scale, window)
    return out.unsqueeze(0), None


def register() -> str:
    """Idempotently register the attention function; returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sagellm_paged_attention)
    return ATTN_IMPLEMENTATION
