"""KV tiers on a CUDA GPU: pinned host slab, side-stream loads, disk under them; greedy tokens equal
with tiers on and off (eager and async scheduling, CUDA graphs; loads admitted into the step being
planned, copies waiting for their blocks' steps), and after a restart from disk."""

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
    waits = dict(engine.kv_pools[0].tiers.steps.waits)  # type: ignore[union-attr]
    engine.release()
    assert got == expected
    assert waits["none"] + waits["step"] > 0, f"no copy was ordered by the steps' stamps: {waits}"
    assert sum(stats["kv_pools"][0].tier_hit_tokens) > 0
    loaded = [tier for tier in stats["kv_tiers"] if tier["loads"] > 0]  # host or disk, by what was evicted where
    assert loaded and all(tier["load_bandwidth"] > 0 for tier in loaded)
    restarted, again = _run(tiny_models["llama"], schedule, disk_path=str(tmp_path))
    assert restarted == expected and again.kv_pools[0].stats().tier_hit_tokens[0] > 0
    again.release()


def test_copy_stream_saves_before_compute_overwrites_and_loads_back(tmp_path: Path) -> None:
    """Evicted blocks are copied down on the copy stream before later compute overwrites them (the
    compute stream waits for the save event), and a load of host and disk blocks lands intact."""
    import torch

    from sagellm_core.config import KVTiersConfig
    from sagellm_core.kv.tiers.base import TierContext, chain_key, root_key
    from sagellm_core.kv.tiers.disk import DiskTier
    from sagellm_core.kv.tiers.host import HostTier
    from sagellm_core.kv.tiers.store import TierItem, TierStore

    device = torch.device("cuda")
    pool = torch.randn((4, 2, 32, 16, 2, 64), device=device, dtype=torch.bfloat16)
    context = TierContext((4, 2, 16, 2, 128), device, "fp", KVTiersConfig())
    host = HostTier(context, 8 * context.block_bytes)
    disk = DiskTier(context, tmp_path, 64 << 20)
    store = TierStore([host, disk], device)
    store.bind(pool)
    assert host.slab.is_pinned()
    original = pool.clone()
    items, key = [], root_key(None)
    for block_id in range(16):
        key = chain_key(key, [block_id])
        items.append(TierItem(block_id, key, (block_id,)))
    for item in items:
        store.save(item)
    store.flush()
    pool.zero_()  # queued on the compute stream after the flush: the copies must not see it
    ticket = store.start_load([TierItem(16 + i, item.key, item.token_ids) for i, item in enumerate(items)])
    store.wait(ticket)
    assert store.poll(ticket) and ticket.count == 16
    torch.cuda.synchronize()
    for i in range(16):
        assert torch.equal(pool[:, :, 16 + i], original[:, :, i]), f"block {i} came back changed"
    stats = store.stats()
    assert stats[0].load_bandwidth > 0 and stats[0].load_bytes == 16 * context.block_bytes
    assert stats[1].loads > 0, "blocks the 8-slot host tier handed down were read back from disk"
    store.close()
