"""Tensor parallelism: Megatron-style sharding of a decoder's attention and MLP projections.

Each rank keeps a contiguous slice of the attention heads (query heads and their key/value heads
together, so grouped-query attention stays local) and of the MLP's intermediate features. The
column-parallel projections (q/k/v, gate/up) hold row slices of their weights and need no
communication; the row-parallel ones (o_proj, down_proj) hold column slices and sum their partial
outputs with one all-reduce each. Embeddings, norms and the LM head stay replicated, so every rank
computes the same logits and the KV pool of each rank holds only its own key/value heads.

After sharding, the model's config reports the per-rank head counts (``num_attention_heads``,
``num_key_value_heads``), which is what the KV pool and the attention op must size themselves by.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sagellm_core.errors import ConfigError

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


class RowParallelLinear(nn.Module):
    """A linear layer holding a slice of the input features; the partial products are summed over
    the group (the bias, replicated, is added once after the sum)."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int, group: Any = None) -> None:
        super().__init__()
        width = linear.in_features // world_size
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * width:(rank + 1) * width].contiguous(),
                                   requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = width, linear.out_features
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


def column_slice(linear: nn.Linear, rank: int, world_size: int) -> nn.Linear:
    """A linear layer computing rows ``[rank * n, (rank + 1) * n)`` of ``linear``'s output."""
    rows = linear.out_features // world_size
    part = nn.Linear(linear.in_features, rows, bias=linear.bias is not None,
                     dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        part.weight.copy_(linear.weight[rank * rows:(rank + 1) * rows])
        if linear.bias is not None:
            part.bias.copy_(linear.bias[rank * rows:(rank + 1) * rows])
    part.requires_grad_(False)
    return part


def check_shardable(model: nn.Module, world_size: int) -> None:
    """Raise `ConfigError` naming what stops ``model`` from being sharded ``world_size`` ways."""
    config = _text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", 0)
    problems = []
    if heads % world_size or kv_heads % world_size:
        problems.append(f"{heads} attention heads and {kv_heads} key/value heads must both divide by {world_size}")
    if intermediate % world_size:
        problems.append(f"intermediate_size {intermediate} must divide by {world_size}")
    for index, layer in enumerate(_decoder_layers(model)):
        missing = [name for name in COLUMN_PARALLEL + ROW_PARALLEL if _find(layer, name) is None]
        if missing:
            problems.append(f"decoder layer {index} has no separate {', '.join(missing)} projection "
                            "(fused or mixture-of-experts layers are not sharded yet)")
            break
    if problems:
        raise ConfigError(f"parallel.tensor_parallel_size: cannot shard {type(model).__name__} "
                          f"{world_size} ways: {'; '.join(problems)}")


def shard_model(model: nn.Module, rank: int, world_size: int, group: Any = None) -> nn.Module:
    """Shard ``model`` in place for ``rank`` of ``world_size`` (a no-op for one rank)."""
    if world_size == 1:
        return model
    check_shardable(model, world_size)
    for layer in _decoder_layers(model):
        for name in COLUMN_PARALLEL:
            parent, attr = _find(layer, name)  # type: ignore[misc]
            setattr(parent, attr, column_slice(getattr(parent, attr), rank, world_size))
        for name in ROW_PARALLEL:
            parent, attr = _find(layer, name)  # type: ignore[misc]
            setattr(parent, attr, RowParallelLinear(getattr(parent, attr), rank, world_size, group))
    config = _text_config(model)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    config.num_attention_heads //= world_size
    config.num_key_value_heads = kv_heads // world_size
    config.sagellm_tensor_parallel = (rank, world_size)
    return model


def _text_config(model: nn.Module) -> Any:
    config: Any = getattr(model, "config")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return list(layers)
    raise ConfigError(f"parallel.tensor_parallel_size: {type(model).__name__} has no decoder layers "
                      "with a `self_attn` module")


def _find(layer: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """The (parent, attribute) of the projection ``name`` in a decoder layer's attention or MLP."""
    for holder in ("self_attn", "mlp"):
        parent = getattr(layer, holder, None)
        if parent is not None and isinstance(getattr(parent, name, None), nn.Linear):
            return parent, name
    return None
