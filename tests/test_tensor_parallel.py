"""Tensor-parallel sharding over gloo: two processes compute the unsharded model's logits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sagellm_core.errors import ConfigError
from sagellm_core.parallel.tensor_parallel import check_shardable, shard_model

WORLD = 2


def _logits(model_dir: str, ids: list[int], rank: int = 0, world: int = 1) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    shard_model(model, rank, world)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def _worker(rank: int, model_dir: str, ids: list[int], port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.save(_logits(model_dir, ids, rank, WORLD), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_two_ranks_compute_the_unsharded_logits(tiny_models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    ids = [5, 17, 42, 99, 3, 250, 7]
    expected = _logits(str(tiny_models[arch]), ids)
    torch.multiprocessing.spawn(_worker, args=(str(tiny_models[arch]), ids, _free_port(), str(tmp_path)),
                                nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


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
