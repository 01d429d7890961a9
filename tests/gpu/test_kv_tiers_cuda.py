"""KV tiers on a CUDA GPU: pinned host slab, side-stream loads, disk under them; greedy tokens equal
with tiers on and off (eager and async scheduling, CUDA graphs), and after a restart from disk."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from conftest import engine_config
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _conversations(count: int = 8) -> list[list[int]]:
    rng = random.Random(0)
    system = [rng.randrange(1, 256) for _ in range(48)]
    return [system + [rng.randrange(1, 256) for _ in range(rng.randrange(20, 60))] for _ in range(count)] * 2


def _run(model: Path, schedule: str, **tiers: Any) -> tuple[list[list[int]], LLMEngine]:
    config = engine_config(model, backend={"name": "cuda"}, kv_cache={"block_size": 16, "num_blocks": 12},
                           scheduler={"max_num_seqs": 2, "async_scheduling": "off" if schedule == "sync" else "auto"},
                           kv_tiers=tiers)
    engine = LLMEngine(config)
    outputs = []
    for prompt in _conversations():
        engine.add_request(prompt, PARAMS)
        while engine.has_unfinished():
            outputs += [list(o.outputs[0].token_ids) for o in engine.step() if o.finished]
    return outputs, engine


@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_tiers_keep_greedy_tokens_on_gpu(tiny_models: dict[str, Path], tmp_path: Path, schedule: str) -> None:
    expected, plain = _run(tiny_models["llama"], schedule)
    plain.release()
    got, engine = _run(tiny_models["llama"], schedule, host_bytes=16 * 4096, disk_path=str(tmp_path))
    stats = engine.get_stats()
    engine.release()
    assert got == expected
    assert sum(stats["kv_pools"][0].tier_hit_tokens) > 0
    loaded = [tier for tier in stats["kv_tiers"] if tier["loads"] > 0]  # host or disk, by what was evicted where
    assert loaded and all(tier["load_bandwidth"] > 0 for tier in loaded)
    restarted, again = _run(tiny_models["llama"], schedule, disk_path=str(tmp_path))
    assert restarted == expected and again.kv_pools[0].stats().tier_hit_tokens[0] > 0
    again.release()
