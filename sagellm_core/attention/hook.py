"""Registers sageLLM's paged attention as a transformers attention implementation.

Every decoder model in transformers calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with (module, query, key, value, mask, scaling=..., **kwargs). The model runner flattens the whole
step into one sequence of T tokens (batch 1) and passes a `StepContext` as the ``sagellm_step``
keyword, which transformers forwards to this function unchanged. The layer's ``sliding_window``,
attention sinks (``s_aux``) and logit soft cap (``softcap``) are handed to the backend's op.
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
    layer_cache = step.kv_cache[getattr(module, "layer_idx")]
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    # Passed only when a layer asks for them: ops that implement neither keep the original signature
    # (the loader refuses models that need a feature the backend's op lacks).
    modifiers: dict[str, Any] = {}
    if kwargs.get("s_aux") is not None:
        modifiers["sinks"] = kwargs["s_aux"]
    if kwargs.get("softcap") is not None:
        modifiers["softcap"] = kwargs["softcap"]
    out = step.op(q, k, v, layer_cache[0], layer_cache[1], step.meta, scale, window, **modifiers)
    return out.unsqueeze(0), None


def register() -> str:
    """Idempotently register the attention function; returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, sagellm_paged_attention)
    return ATTN_IMPLEMENTATION
