"""Tensor-parallel sharding of a model (the two-process engine runs are in test_parallel_engine.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm_core.errors import ConfigError
from sagellm_core.parallel.tensor_parallel import check_shardable, shard_model


def test_sharding_updates_head_counts_and_slices_weights(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    full_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    # one rank's slice, without a process group: only the construction is checked here
    shard_model(model, rank=1, world_size=2)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.shape[0] == full_q.shape[0] // 2
    torch.testing.assert_close(q, full_q[full_q.shape[0] // 2:])
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)


def test_unshardable_head_count_is_refused(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with pytest.raises(ConfigError, match="key/value heads must both divide by 4"):
        check_shardable(model, 4)
