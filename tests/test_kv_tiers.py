"""KV tiers under the device pool: the same greedy tokens with tiers on and off, disk blocks that
survive restarts and are checked on every read, a full disk, cache salts, and a randomized workload
over all tiers with aborts and preemption."""

from __future__ import annotations

import errno
import os
import random
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import engine_config
from sagellm_core.builtin.kv_policies import PrefixLRUPolicy
from sagellm_core.builtin.schedulers import FCFSScheduler
from sagellm_core.config import KVTiersConfig, SchedulerConfig
from sagellm_core.engine.core import LLMEngine
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.kv.tiers import disk as disk_module
from sagellm_core.kv.tiers import store as store_module
from sagellm_core.kv.tiers.base import TierContext, chain_key, root_key
from sagellm_core.kv.tiers.disk import DiskTier
from sagellm_core.kv.tiers.gate import MIN_SLOPE_SHARE, PROBE_EVERY, LoadGate
from sagellm_core.kv.tiers.host import HostTier
from sagellm_core.kv.tiers.store import TierItem, TierStore, pending_write_limit, slot_runs
from sagellm_core.request import Request, RequestStatus
from sagellm_core.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def workload(seed: int = 0, num: int = 6) -> list[list[int]]:
    """Conversations sharing a system prompt, each longer than the device pool can keep for all."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 250) for _ in range(24)]
    return [system + [rng.randrange(1, 250) for _ in range(rng.randrange(9, 20))] for _ in range(num)] * 2


def run_one_by_one(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams = GREEDY,
                   ) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        engine.add_request(prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs.append(list(out.outputs[0].token_ids))
            for pool in engine.kv_pools:
                pool.check_invariants()
    return outputs


def tiny_engine(model: Path, num_blocks: int = 16, **tiers: Any) -> LLMEngine:
    return LLMEngine(engine_config(model, kv_cache={"num_blocks": num_blocks}, scheduler={"max_num_seqs": 2},
                                   kv_tiers=tiers))


def tier_hits(engine: LLMEngine) -> tuple[int, ...]:
    return engine.kv_pools[0].stats().tier_hit_tokens


@pytest.fixture(scope="module")
def baseline(tiny_models: dict[str, Path]) -> list[list[int]]:
    engine = tiny_engine(tiny_models["llama"])
    try:
        return run_one_by_one(engine, workload())
    finally:
        engine.release()


@pytest.mark.parametrize("tiers", [
    {"host_bytes": 1 << 20},
    {"host_bytes": 1 << 20, "write_mode": "through"},
    {"host_bytes": 12 << 10, "disk_path": "DISK"},
    {"disk_path": "DISK"},
], ids=["host", "host-through", "host-disk", "disk"])
def test_greedy_tokens_identical_with_tiers_under_eviction(tiny_models: dict[str, Path], baseline: list[list[int]],
                                                           tiers: dict[str, Any], tmp_path: Path) -> None:
    tiers = {k: (str(tmp_path) if v == "DISK" else v) for k, v in tiers.items()}
    engine = tiny_engine(tiny_models["llama"], **tiers)
    try:
        assert run_one_by_one(engine, workload()) == baseline
        hits = tier_hits(engine)
        assert sum(hits) > 0, "the device pool evicted the shared blocks, so a tier must have served some"
        stats = engine.get_stats()["kv_tiers"]
        assert [s["name"] for s in stats] == KVTiersConfig(**tiers).names()
        assert sum(s["loads"] for s in stats) * 4 == sum(hits)
    finally:
        engine.release()


def test_restarted_engine_answers_from_disk(tiny_models: dict[str, Path], baseline: list[list[int]],
                                            tmp_path: Path) -> None:
    prompts = workload()
    first = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    run_one_by_one(first, prompts[:3])
    first.release()  # writes what is cached on the device to disk
    second = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    try:
        assert run_one_by_one(second, prompts[:1]) == baseline[:1]
        assert tier_hits(second)[0] >= 24, "the first request of the new engine hit the shared prompt on disk"
    finally:
        second.release()


def test_other_weights_do_not_see_the_blocks(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    prompts = workload()
    first = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    run_one_by_one(first, prompts[:2])
    first.release()
    other = tiny_engine(tiny_models["qwen2"], disk_path=str(tmp_path))
    try:
        run_one_by_one(other, prompts[:1])
        assert tier_hits(other) == (0,)
        assert len(list(tmp_path.iterdir())) == 2, "one directory per fingerprint"
    finally:
        other.release()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_disk_blocks_are_recomputed(tiny_models: dict[str, Path], baseline: list[list[int]],
                                            tmp_path: Path, damage: str) -> None:
    prompts = workload()
    first = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    run_one_by_one(first, prompts[:3])
    first.release()
    files = sorted(tmp_path.glob("*/*.kvb"))
    assert files
    for path in files:
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[len(raw) // 2] ^= 0xFF
        else:
            raw = raw[: len(raw) - 7]
        path.write_bytes(bytes(raw))
    second = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    try:
        assert run_one_by_one(second, prompts[:3]) == baseline[:3]
        assert tier_hits(second) == (0,)
        assert second.get_stats()["kv_tiers"][0]["errors"] >= 1
        assert not any(path.exists() and path.read_bytes() == b"" for path in files)
    finally:
        second.release()


def test_full_disk_degrades_to_not_storing(tiny_models: dict[str, Path], baseline: list[list[int]],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module.os, "replace", no_space)
    engine = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    try:
        assert run_one_by_one(engine, workload()) == baseline
        engine.kv_pools[0].tiers.ready()  # the background writes have failed by now
        stats = engine.get_stats()["kv_tiers"][0]
        assert stats["errors"] > 0 and stats["num_blocks"] == 0
        assert not list(tmp_path.glob("*/*")), "no temporary file is left behind"
    finally:
        engine.release()


def test_cache_salt_isolates_requests_on_every_tier(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    engine = tiny_engine(tiny_models["llama"], num_blocks=16, host_bytes=1 << 20, disk_path=str(tmp_path))
    try:
        prompt = workload()[0]
        salted = [SamplingParams(temperature=0.0, max_tokens=2, cache_salt=s) for s in ("alice", "bob")]
        run_one_by_one(engine, [prompt], salted[0])
        device_hits = engine.kv_pools[0].stats().prefix_hit_tokens
        run_one_by_one(engine, [prompt], salted[1])
        assert engine.kv_pools[0].stats().prefix_hit_tokens == device_hits, "bob must not hit alice's blocks"
        run_one_by_one(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=2))
        assert engine.kv_pools[0].stats().prefix_hit_tokens == device_hits, "no salt: no hit either"
        run_one_by_one(engine, workload(seed=5), GREEDY)  # push everything out of the device pool
        before = engine.kv_pools[0].stats().prefix_hit_tokens
        run_one_by_one(engine, [prompt], salted[0])
        after = engine.kv_pools[0].stats()
        assert after.prefix_hit_tokens > before and sum(after.tier_hit_tokens) > 0, "alice hits her own, below"
    finally:
        engine.release()


def test_cache_salt_is_validated() -> None:
    from sagellm_core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="cache_salt"):
        SamplingParams(cache_salt="")
    with pytest.raises(InvalidRequestError, match="cache_salt"):
        SamplingParams(cache_salt=5)  # type: ignore[arg-type]


def test_chain_keys_are_salted_and_stable() -> None:
    assert chain_key(root_key(None), [1, 2]) == chain_key(b"", [1, 2])
    assert chain_key(root_key("a"), [1, 2]) != chain_key(root_key("b"), [1, 2])
    assert chain_key(root_key(None), [1, 2]) != chain_key(root_key(None), [2, 1])


def test_disk_tier_checks_tokens_size_and_digest(tmp_path: Path) -> None:
    context = TierContext((1, 2, 4, 1, 8), torch.device("cpu"), "fp", KVTiersConfig())
    tier = DiskTier(context, tmp_path, 1 << 20)
    data = torch.arange(64, dtype=torch.uint8).view(context.block_shape)
    assert tier.put(b"k" * 16, data, (1, 2, 3, 4))
    block = tier.get(b"k" * 16)  # served from the queued copy or the file, whichever is first
    assert block is not None and block.token_ids == (1, 2, 3, 4) and torch.equal(block.data, data)
    tier.ready()
    block = tier.get(b"k" * 16)  # from the file
    assert block is not None and block.token_ids == (1, 2, 3, 4) and torch.equal(block.data, data)
    tier.close()
    reopened = DiskTier(context, tmp_path, 1 << 20)
    assert reopened.contains(b"k" * 16)
    path = reopened.path(b"k" * 16)
    path.write_bytes(path.read_bytes()[:-1])
    assert reopened.get(b"k" * 16) is None and reopened.stats.errors == 1 and not reopened.contains(b"k" * 16)
    reopened.ready()  # the file is deleted on the writer thread
    assert not path.exists()
    reopened.close()


def test_a_block_file_is_read_in_one_call_and_any_size_mismatch_is_a_miss(tmp_path: Path) -> None:
    """`read_block` with the expected token count reads the file at once; a file of fewer tokens is
    read again with its count; a byte more or less, or more tokens than expected, is no block."""
    data = np.arange(64, dtype=np.uint8)
    path = tmp_path / "block.kvb"
    out = np.zeros(64, dtype=np.uint8)
    for tokens in [(1, 2, 3, 4), (7, 8)]:
        path.write_bytes(disk_module.encode_block(data, tokens))
        for guess in (4, None):
            out[:] = 0
            assert disk_module.read_block(path, out.data, guess) == tokens and np.array_equal(out, data)
    path.write_bytes(disk_module.encode_block(data, (1, 2, 3, 4, 5)))
    assert disk_module.read_block(path, out.data, 4) is None
    whole = disk_module.encode_block(data, (1, 2, 3, 4))
    for broken in (whole + b"\0", whole[:-1], whole[:10]):
        path.write_bytes(broken)
        assert disk_module.read_block(path, out.data, 4) is None
        assert disk_module.read_block(path, out.data) is None


def test_block_files_are_written_whole_across_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`write_file` goes on after a short ``writev`` (at most 5 bytes a call here)."""
    writev = os.writev
    monkeypatch.setattr(disk_module.os, "writev", lambda fd, views: writev(fd, [bytes(views[0][:5])]))
    parts = [b"header", np.arange(23, dtype=np.uint8).data, b"", b"end"]
    disk_module.write_file(tmp_path / "f", parts)
    assert (tmp_path / "f").read_bytes() == b"header" + bytes(range(23)) + b"end"


# ---- the store: batched copies, loads that do not block the step ---------------------------------------
def store_with_pool(directory: Path, host_blocks: int, device: str = "cpu", num_blocks: int = 16,
                    ) -> tuple[TierStore, torch.Tensor, HostTier, DiskTier]:
    """A store over a host tier of ``host_blocks`` and a disk tier, bound to a random pool."""
    pool = torch.randn((2, 2, num_blocks, 4, 1, 8), device=device)  # [layers, K/V, blocks, tokens, heads, dim]
    context = TierContext((2, 2, 4, 1, 32), torch.device(device), "fp", KVTiersConfig())
    host = HostTier(context, host_blocks * context.block_bytes)
    disk = DiskTier(context, directory, 1 << 20)
    store = TierStore([host, disk], torch.device(device))
    store.bind(pool)
    return store, pool, host, disk


def items_for(block_ids: list[int], salt: int = 0) -> list[TierItem]:
    keys, key = [], root_key(None)
    for block_id in block_ids:
        key = chain_key(key, [salt, block_id])
        keys.append(TierItem(block_id, key, (salt, block_id)))
    return keys


def test_slot_runs_join_consecutive_positions_and_slots() -> None:
    assert slot_runs([(0, 3), (1, 4), (2, 5), (3, 9), (4, 10), (5, 2)]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert slot_runs([]) == []


class StalledDisk(DiskTier):
    """A disk tier whose writer waits for ``go`` before each file (a disk slower than eviction)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = threading.Event()

    def _write(self, key: bytes, pending: Any) -> None:
        self.go.wait()
        super()._write(key, pending)


def test_a_host_tier_drops_victims_instead_of_queueing_writes_without_bound(tmp_path: Path) -> None:
    """With `pending_write_limit` blocks on their way to a stalled disk, a flush drops blocks (counted)
    instead of waiting or staging more: every block is in the host tier, on its way to the disk (and
    there once it writes) or dropped."""
    pool = torch.randn((2, 2, 256, 4, 1, 8))
    context = TierContext((2, 2, 4, 1, 32), torch.device("cpu"), "fp", KVTiersConfig())
    host, disk = HostTier(context, 96 * context.block_bytes), StalledDisk(context, tmp_path, 1 << 24)
    store = TierStore([host, disk], torch.device("cpu"))
    store.bind(pool)
    limit = pending_write_limit(host.capacity)
    saved = items_for(list(range(240)))
    try:
        for start in range(0, 240, 48):
            for item in saved[start:start + 48]:
                store.save(item)
            store.flush()
            assert len(host.draining) + store._overflow.count == disk.stats.stores <= limit
        assert host.stats.write_drops > 0 and disk.stats.stores == limit
        levels = [store.find(item.key) for item in saved]
        assert levels.count(None) == host.stats.write_drops  # the rest: in the host slab (draining too) or staged
    finally:
        disk.go.set()
    store.ready()
    assert not host.draining and disk.stats.num_blocks == disk.stats.stores
    store.close()


def test_waiting_for_a_load_is_charged_to_the_lowest_tier_it_reads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain from the host slab and the disk: the engine thread's wait counts for the disk tier."""
    store, _, host, disk = store_with_pool(tmp_path, host_blocks=4, num_blocks=24)
    saved = items_for(list(range(8)))
    for item in saved:
        store.save(item)
    store.flush()
    store.ready()
    clock = iter(range(100))
    monkeypatch.setattr(store_module.time, "perf_counter", lambda: float(next(clock)))
    ticket = store.start_load([TierItem(16 + i, item.key, item.token_ids) for i, item in enumerate(saved)])
    assert set(ticket.levels) == {0, 1}
    store.wait(ticket)
    monkeypatch.undo()
    assert ticket.count == 8 and disk.stats.wait_seconds > 0 and host.stats.wait_seconds == 0
    store.close()


def test_a_burst_beyond_the_host_slots_is_staged_in_slots_pinned_at_bind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks with no free host slot go down through the staging slab's free slots (4 here) and no
    host memory is allocated during a flush; beyond them blocks are dropped (counted). Once the disk
    has written them, the slots stage the next burst."""
    monkeypatch.setattr(store_module, "STAGING_BLOCKS", 4)
    pool = torch.randn((2, 2, 64, 4, 1, 8))
    context = TierContext((2, 2, 4, 1, 32), torch.device("cpu"), "fp", KVTiersConfig())
    host, disk = HostTier(context, 4 * context.block_bytes), StalledDisk(context, tmp_path, 1 << 24)
    store = TierStore([host, disk], torch.device("cpu"))
    store.bind(pool)

    def no_allocation(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("a flush allocated host memory")

    try:
        for burst in range(2):
            for item in items_for(list(range(12)), salt=burst):
                store.save(item)
            with monkeypatch.context() as patch:
                patch.setattr(store_module.torch, "empty", no_allocation)
                store.flush()
            assert store._overflow.count == 4 and host.stats.write_drops >= 4 * (burst + 1)
            disk.go.set()
            store.ready()
            disk.go.clear()
    finally:
        disk.go.set()
    assert store._overflow.count == 0 and disk.stats.num_blocks == disk.stats.stores >= 8
    store.close()


def test_store_saves_in_one_flush_and_loads_back_from_host_and_disk(tmp_path: Path) -> None:
    """12 blocks through a 4-slot host tier: the slab takes 4, the rest go to disk through the staging
    slab (no wait for the writer); the whole chain, longer than the slab, loads back."""
    store, pool, host, disk = store_with_pool(tmp_path, host_blocks=4, num_blocks=24)
    original = pool.clone()
    saved = items_for(list(range(12)))
    for item in saved:
        store.save(item)
    assert host.stats.num_blocks == 0, "nothing is copied before the flush"
    store.flush()
    assert host.stats.num_blocks == 4 and disk.stats.num_blocks == 8
    pool.zero_()
    targets = [TierItem(12 + i, item.key, item.token_ids) for i, item in enumerate(saved)]
    ticket = store.start_load(targets)
    store.wait(ticket)
    assert store.poll(ticket) and ticket.count == 12
    for i in range(12):
        assert torch.equal(pool[:, :, 12 + i], original[:, :, i]), f"block {i} came back changed"
    stats = store.stats()
    assert stats[0].loads == 4 and stats[1].loads == 8 and sum(t.hits for t in stats) == 12
    assert stats[0].load_bytes == 12 * host.context.block_bytes, "every block was copied up from host memory"
    assert stats[1].load_bytes == 8 * host.context.block_bytes
    store.close()


def stored_chain(directory: Path, host_blocks: int) -> tuple[TierStore, HostTier, DiskTier, list[TierItem]]:
    """A store over ``host_blocks`` host slots and a disk tier holding a saved chain of 6 blocks."""
    store, _, host, disk = store_with_pool(directory, host_blocks=host_blocks)
    saved = items_for(list(range(6)))
    for item in saved:
        store.save(item)
    store.flush()
    store.ready()
    return store, host, disk, saved


def test_a_corrupt_file_ends_the_loaded_chain_there(tmp_path: Path) -> None:
    store, host, disk, saved = stored_chain(tmp_path, host_blocks=1)
    on_disk = [i for i, item in enumerate(saved) if disk.path(item.key).exists() and not host.contains(item.key)]
    assert on_disk, "the one-slot host tier handed blocks down"
    broken = on_disk[0]
    path = disk.path(saved[broken].key)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    ticket = store.start_load([TierItem(8 + i, item.key, item.token_ids) for i, item in enumerate(saved)])
    store.wait(ticket)
    assert ticket.count == broken and disk.stats.errors == 1 and not disk.contains(saved[broken].key)
    store.close()


def test_a_cancelled_load_gives_its_host_slots_back(tmp_path: Path) -> None:
    store, host, disk, saved = stored_chain(tmp_path, host_blocks=2)
    ticket = store.start_load([TierItem(8 + i, item.key, item.token_ids) for i, item in enumerate(saved)])
    store.cancel(ticket)
    store.ready()  # the reads land; the cancelled ticket's slots are resolved
    assert not host.filling and ticket.count is not None
    assert len(host.free_slots) + len(host.slots) + len(host.draining) == host.capacity
    assert sum(t.loads for t in store.stats()) == 0, "a cancelled load counts no loads"
    store.close()


# ---- randomized: bookkeeping over every tier ---------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    num_blocks=st.integers(6, 24),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(2, 32),
    max_seqs=st.integers(1, 4),
    host_blocks=st.integers(0, 6),
    disk_blocks=st.integers(0, 12),
    write_mode=st.sampled_from(["back", "through"]),
    seed=st.integers(0, 10_000),
    num_requests=st.integers(1, 14),
)
def test_randomized_workloads_over_tiers_serve_only_the_right_tokens(
        num_blocks: int, block_size: int, budget: int, max_seqs: int, host_blocks: int, disk_blocks: int,
        write_mode: str, seed: int, num_requests: int) -> None:
    """Each device block's "KV" is the tokens it was computed for; whatever a request starts from
    (its own blocks, device prefix hits, blocks loaded from host or disk) must hold its tokens.
    With aborts and preemption no block is lost or leaked in the pool or any tier."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as directory:
        pool_tensor = torch.full((1, 2, num_blocks, block_size, 1, 1), -1.0)
        context = TierContext((1, 2, block_size, 1, 4), torch.device("cpu"), "fp", KVTiersConfig())
        tiers: list[Any] = []
        if host_blocks:
            tiers.append(HostTier(context, host_blocks * context.block_bytes))
        if disk_blocks:
            disk_bytes = disk_blocks * (context.block_bytes + 8 * block_size + disk_module.HEADER.size)
            tiers.append(DiskTier(context, directory, disk_bytes))
        store = TierStore(tiers, torch.device("cpu"), write_mode) if tiers else None
        if store is not None:
            store.bind(pool_tensor)
        kv = KVCacheManager(num_blocks, block_size, PrefixLRUPolicy(), store)
        scheduler = FCFSScheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget))
        scheduler.bind([kv])
        base = [rng.randrange(50) for _ in range(64)]
        pending = []
        for i in range(num_requests):
            max_tokens = rng.randint(1, 4)
            length = rng.randint(1, max(1, min(24, num_blocks * block_size - max_tokens)))
            tokens = base[: rng.randint(0, length)]
            tokens += [rng.randrange(50) for _ in range(length - len(tokens))]
            salt = rng.choice([None, None, "s"])
            pending.append(Request(f"r{i}", tokens, SamplingParams(max_tokens=max_tokens, cache_salt=salt),
                                   max_tokens))
        finished: list[str] = []
        steps = 0
        while pending or scheduler.has_work():
            steps += 1
            assert steps < 3000, "no progress"
            if pending and rng.random() < 0.5:
                scheduler.add(pending.pop(0))
            if scheduler.running and rng.random() < 0.05:
                victim = rng.choice(scheduler.running + scheduler.waiting)
                victim.status = RequestStatus.FINISHED_ABORTED
                scheduler.finish(victim)
                finished.append(victim.request_id)
            plan = scheduler.schedule()
            for chunk in plan.chunks:
                request = chunk.request
                table = kv.block_ids(request.request_id)
                tokens = request.all_token_ids
                for position in range(request.num_computed_tokens):
                    block, offset = table[position // block_size], position % block_size
                    assert pool_tensor[0, 0, block, offset, 0, 0].item() == tokens[position], (
                        f"{request.request_id} starts from a block holding other tokens")
                for position in range(request.num_computed_tokens, request.num_computed_tokens + chunk.num_tokens):
                    block, offset = table[position // block_size], position % block_size
                    pool_tensor[0, 0, block, offset, 0, 0] = float(tokens[position])
                completes = request.num_computed_tokens + chunk.num_tokens == request.num_tokens
                request.num_computed_tokens += chunk.num_tokens
                if completes:
                    request.output_token_ids.append(rng.randrange(50))
            scheduler.after_step(plan)
            for chunk in plan.chunks:
                request = chunk.request
                if request.num_output_tokens >= request.max_tokens and not request.is_finished:
                    request.status = RequestStatus.FINISHED_LENGTH
                    scheduler.finish(request)
                    finished.append(request.request_id)
            kv.check_invariants()
            for tier in tiers:
                assert tier.stats.num_blocks == len(tier.keys()) <= tier.capacity
            if host_blocks:
                host = tiers[0]
                assert (len(host.free_slots) + len(host.slots) + len(host.draining) + len(host.filling)
                        == host.capacity), "a host slot was lost or counted twice"
        assert sorted(finished) == sorted(f"r{i}" for i in range(num_requests))
        assert kv.stats().used_blocks == 0
        if disk_blocks:
            disk = tiers[-1]
            disk.ready()  # the background writes have landed
            assert sorted(p.name for p in Path(disk.directory).iterdir()) == sorted(
                disk.path(key).name for key in disk.keys())


# ---- configuration, metrics, protocol ----------------------------------------------------------------
def test_tiers_config_from_the_environment_and_its_errors() -> None:
    from sagellm_core.config import ConfigError, EngineConfig, load_config

    config = load_config(environ={"SAGELLM_KV_TIERS__HOST_BYTES": "1048576",
                                  "SAGELLM_KV_TIERS__DISK_PATH": "/var/cache/kv"})
    assert config.kv_tiers.names() == ["host", "disk"] and config.kv_tiers.disk_path == "/var/cache/kv"
    with pytest.raises(ConfigError, match="kv_tiers.write_mode"):
        EngineConfig.from_dict({"kv_tiers": {"write_mode": "sideways"}})
    with pytest.raises(ConfigError, match="kv_tiers.host_bytes"):
        EngineConfig.from_dict({"kv_tiers": {"host_bytes": -1}})


def test_unknown_plugin_tier_is_refused_with_the_registered_names() -> None:
    from sagellm_core.config import EngineConfig
    from sagellm_core.plugin_manager import create_plugin_manager
    from sagellm_core.plugin_selection import PluginSelectionError, validate_plugin_selection

    config = EngineConfig.from_dict({"kv_tiers": {"extra": ["redis"]}})
    with pytest.raises(PluginSelectionError, match=r"kv_tiers.extra\[0\]: unknown kv_tier 'redis'; registered: disk, host"):
        validate_plugin_selection(config, create_plugin_manager(entry_points=False))


def test_a_plugin_tier_is_stacked_below_the_builtin_ones(tiny_models: dict[str, Path], baseline: list[list[int]],
                                                        ) -> None:
    from sagellm_core.hookspecs import hookimpl
    from sagellm_core.plugin_manager import create_plugin_manager

    class Plugin:
        @staticmethod
        @hookimpl
        def sagellm_register_kv_tiers(register: Any) -> None:
            register("more_host", lambda context: HostTier(context, 64 << 10))

    manager = create_plugin_manager(entry_points=False, extra={"more": Plugin()})
    config = engine_config(tiny_models["llama"], kv_cache={"num_blocks": 16}, scheduler={"max_num_seqs": 2},
                           kv_tiers={"host_bytes": 4 << 10, "extra": ["more_host"]})
    engine = LLMEngine(config, plugin_manager=manager)
    try:
        assert run_one_by_one(engine, workload()) == baseline
        assert [t["name"] for t in engine.get_stats()["kv_tiers"]] == ["host", "host"]
        assert tier_hits(engine)[1] > 0, "blocks the small host tier gave up were found one tier down"
    finally:
        engine.release()


def test_tier_gauges_reach_prometheus() -> None:
    from sagellm_core.kv.manager import KVStats
    from sagellm_core.kv.tiers.base import TierStats
    from sagellm_core.metrics.base import StepEvent
    from sagellm_core.metrics.prometheus import PrometheusSink

    sink = PrometheusSink()
    kv = KVStats(8, 0, 8, 2, 100, 60, (40, 8))
    tiers = (TierStats("host", num_blocks=3, bytes=3072, loads=10, load_bytes=10240, load_seconds=0.01),
             TierStats("disk", num_blocks=5, bytes=5500, loads=2))
    sink.on_step(StepEvent(1, 0.0, 1.0, 0, 0, 0, 0, 0, 0, 0, (kv,), tiers))
    text = sink.exposition().decode()
    assert 'sagellm_kv_tier_blocks{tier="host"} 3.0' in text
    assert 'sagellm_kv_tier_hit_tokens{tier="disk"} 8.0' in text
    assert 'sagellm_kv_tier_load_bandwidth_bytes_per_second{tier="host"} 1.024e+06' in text


def test_openai_requests_pass_cache_salt_through() -> None:
    from sagellm_core.server.protocol import ChatCompletionRequest, CompletionRequest

    assert CompletionRequest(prompt="hi", cache_salt="tenant-1").sampling_params().cache_salt == "tenant-1"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], cache_salt="t")
    assert chat.sampling_params().cache_salt == "t"
    assert CompletionRequest(prompt="hi").sampling_params().cache_salt is None


# ---- the load gate: load a block only where that beats recomputing it ---------------------------------
def test_load_gate_turns_down_a_tier_slower_than_recompute_and_probes_it(tmp_path: Path) -> None:
    store, _, host, disk = store_with_pool(tmp_path, host_blocks=4)
    gate = store.gate
    assert gate.worth_loading(1, store.tiers, 4), "nothing measured yet: every tier is tried"
    gate.observe_step(prefill_tokens=100, step_tokens=1000, seconds=1.0)  # decode-heavy: says nothing of prefill
    gate.observe_step(prefill_tokens=1000, step_tokens=1000, seconds=1e-3)
    assert gate.token_seconds() == pytest.approx(1e-6)
    block = host.context.block_bytes
    host.stats.load_bytes, host.stats.load_seconds = 1000 * block, 1e-4  # 0.1 us a block
    disk.stats.load_bytes, disk.stats.load_seconds = 1000 * block, 1.0  # 1 ms a block; recompute: 4 us
    assert gate.worth_loading(0, store.tiers, 4)
    decisions = [gate.worth_loading(1, store.tiers, 4) for _ in range(PROBE_EVERY * 2)]
    assert decisions.count(True) == 2 and decisions[PROBE_EVERY - 1] and decisions[-1]
    assert disk.stats.turned_down == 2 * PROBE_EVERY - 2 and host.stats.turned_down == 0
    disk.stats.load_seconds = 1e-4  # the disk got fast (a warm page cache): loaded again
    assert gate.worth_loading(1, store.tiers, 4)
    gate.enabled = False
    disk.stats.load_seconds = 1.0
    assert gate.worth_loading(1, store.tiers, 4)
    store.close()


def test_load_gate_charges_recompute_the_marginal_cost_of_a_token_not_the_step_overhead() -> None:
    """Steps of 5 ms fixed cost plus 2 us a token: a block's recompute costs 2 us a token, however
    small the steps were (the mean over 300-token steps would say 19 us)."""
    gate = LoadGate()
    for tokens in (300, 1000, 4000, 16000, 500, 8000, 300, 2000):
        gate.observe_step(prefill_tokens=tokens, step_tokens=tokens, seconds=5e-3 + 2e-6 * tokens)
    assert gate.token_seconds() == pytest.approx(2e-6)
    alike = LoadGate()  # steps all of one size: no slope to fit, the mean stands in
    for _ in range(4):
        alike.observe_step(prefill_tokens=1000, step_tokens=1000, seconds=4e-3)
    assert alike.token_seconds() == pytest.approx(4e-6)


def host_load_of(store: TierStore, seconds_a_block: float) -> None:
    """The top tier has loaded blocks at ``seconds_a_block`` each."""
    stats = store.tiers[0].stats
    stats.load_bytes, stats.load_seconds = 1000 * store.host.context.block_bytes, 1000 * seconds_a_block


def test_load_gate_a_fit_that_calls_prefill_free_still_loads_a_fast_host_block(tmp_path: Path) -> None:
    """8B-like steps (25 us a token, 5 ms fixed) whose times the fit got paired with the wrong steps:
    an exact line of slope ~0 (every step 40 ms) or times unrelated to the sizes. The recompute of a
    16-token block stays at least `MIN_SLOPE_SHARE` of the mean cost, so a 60 us host load is taken."""
    sizes = [512, 2048, 1024, 1536, 768, 2048, 640, 1280] * 3
    flat = LoadGate()
    for tokens in sizes:
        flat.observe_step(prefill_tokens=tokens, step_tokens=tokens, seconds=0.04 + 1e-10 * tokens)
    noisy = LoadGate()
    rng = random.Random(0)
    for tokens in sizes:
        noisy.observe_step(prefill_tokens=tokens, step_tokens=tokens, seconds=rng.choice([0.018, 0.06, 0.03]))
    store, _, host, _ = store_with_pool(tmp_path, host_blocks=4)
    host_load_of(store, 60e-6)
    for gate in (flat, noisy):
        fit = gate._fit
        assert gate.token_seconds() >= MIN_SLOPE_SHARE * fit.seconds / fit.tokens
        assert gate.worth_loading(0, store.tiers, 16) and not gate.declines(0, store.tiers)
    assert host.stats.turned_down == 0
    store.close()


def test_load_gate_trusts_a_good_fit_over_the_mean() -> None:
    """Steps of 5 ms plus 25 us a token with a little noise: the slope (25 us) is used, not the mean."""
    gate = LoadGate()
    rng = random.Random(1)
    for tokens in [256, 2048, 1024, 512, 1536, 300, 2000, 800] * 3:
        gate.observe_step(prefill_tokens=tokens, step_tokens=tokens,
                          seconds=5e-3 + 25e-6 * tokens + rng.uniform(-5e-4, 5e-4))
    assert gate.token_seconds() == pytest.approx(25e-6, rel=0.1)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_the_gate_learns_from_the_step_whose_device_time_was_waited_for(
        tiny_models: dict[str, Path], mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Synchronous steps time their own plan; under async scheduling a step waits for the step before
    it, so the gate learns from that step's plan: a request's last plan is read by a step that plans
    nothing (and teaches nothing), the first waits for none."""
    engine = LLMEngine(engine_config(tiny_models["llama"], kv_cache={"num_blocks": 16},
                                     scheduler={"max_num_seqs": 2, "async_scheduling": mode},
                                     kv_tiers={"host_bytes": 1 << 20}))
    launched: list[list[Any]] = []
    seen: list[Any] = []
    execute, observe = engine.runner.execute, engine._observe_prefill

    def record(plan: Any, *args: Any, **kwargs: Any) -> Any:
        launched[-1].append(plan)
        return execute(plan, *args, **kwargs)

    def observed(plan: Any, seconds: float) -> None:
        if plan is not None:
            seen.append(plan)
        observe(plan, seconds)

    monkeypatch.setattr(engine.runner, "execute", record)
    monkeypatch.setattr(engine, "_observe_prefill", observed)
    try:
        for prompt in workload(num=2):
            launched.append([])
            run_one_by_one(engine, [prompt])
    finally:
        engine.release()
    assert engine.async_scheduling == (mode == "on") and all(len(plans) > 1 for plans in launched)
    expected = [plan for plans in launched for plan in (plans if mode == "off" else plans[:-1])]
    assert [id(plan) for plan in seen] == [id(plan) for plan in expected]


def test_blocks_skip_a_tier_the_load_gate_turned_down(tmp_path: Path) -> None:
    """Once a disk lookup is turned down, host victims are dropped instead of written to the disk
    (nobody would load them); a lookup the gate lets through again resumes the writes."""
    store, _, host, disk = store_with_pool(tmp_path, host_blocks=4, num_blocks=24)
    gate = store.gate
    for item in items_for(list(range(6))):
        store.save(item)
    store.flush()
    store.ready()
    assert disk.stats.stores == 2 and host.stats.write_drops == 0
    gate.observe_step(prefill_tokens=1000, step_tokens=1000, seconds=1e-3)
    disk.stats.load_bytes, disk.stats.load_seconds = host.context.block_bytes, 1.0
    host.stats.load_bytes, host.stats.load_seconds = host.context.block_bytes, 1e-9
    assert not gate.worth_loading(1, store.tiers, 4) and gate.declines(1, store.tiers)
    for item in items_for(list(range(6, 12)), salt=1):
        store.save(item)
    store.flush()
    store.ready()
    assert disk.stats.stores == 2 and host.stats.write_drops == 6
    disk.stats.load_seconds = 1e-9
    assert gate.worth_loading(1, store.tiers, 4) and not gate.declines(1, store.tiers)
    for item in items_for(list(range(12, 18)), salt=2):
        store.save(item)
    store.flush()
    store.ready()
    assert disk.stats.stores > 2
    store.close()


class FreePrefillGate(LoadGate):
    """A gate that has measured prefill as (almost) free."""

    def token_seconds(self) -> float | None:
        return 1e-12


def test_a_gated_tier_is_recomputed_with_the_same_tokens(tiny_models: dict[str, Path], baseline: list[list[int]],
                                                         tmp_path: Path) -> None:
    """Prefill measured as free, the disk tier is never worth a load: the prompts are recomputed
    (no disk loads past the probes) and the tokens are the baseline's."""
    engine = tiny_engine(tiny_models["llama"], disk_path=str(tmp_path))
    engine.kv_pools[0].tiers.gate = FreePrefillGate()  # type: ignore[union-attr]
    try:
        disk = engine.kv_pools[0].tiers.tiers[0]  # type: ignore[union-attr]
        disk.stats.load_bytes, disk.stats.load_seconds = 1, 1.0  # measured slow before the run
        assert run_one_by_one(engine, workload()) == baseline
        assert engine.get_stats()["kv_tiers"][0]["loads"] <= len(workload()) // PROBE_EVERY + 1
    finally:
        engine.release()


def test_load_gate_holds_a_host_copy_the_step_waits_for_to_the_recompute(tmp_path: Path) -> None:
    """The step that admits a request waits for its host copy: a host block dearer than its
    recompute is recomputed; a disk read runs beside the compute and may cost up to 4x."""
    store, _, host, disk = store_with_pool(tmp_path, host_blocks=4)
    gate = store.gate
    gate.observe_step(prefill_tokens=1000, step_tokens=1000, seconds=1e-3)  # 1 us a token, 4 us a block
    block = host.context.block_bytes
    host.stats.load_bytes, host.stats.load_seconds = 1000 * block, 3e-3  # 3 us a block
    disk.stats.load_bytes, disk.stats.load_seconds = 1000 * block, 9e-3  # 12 us a block with the copy up
    assert gate.worth_loading(0, store.tiers, 4) and gate.worth_loading(1, store.tiers, 4)
    host.stats.load_seconds = 6e-3  # 6 us a block: dearer than its recompute
    assert not gate.worth_loading(0, store.tiers, 4)
    assert gate.worth_loading(1, store.tiers, 4), "6 + 9 us: under 4x the recompute"
    for item in items_for([0, 1]):
        store.save(item)
    store.flush()
    assert host.stats.num_blocks == 0 and host.stats.write_drops == 2, "nothing is written to a declined tier"
    for _ in range(100):  # prefill got dearer (longer contexts): 3 us a token
        gate.observe_step(prefill_tokens=1000, step_tokens=1000, seconds=3e-3)
    assert not gate.declines(0, store.tiers)
    for item in items_for([2, 3]):
        store.save(item)
    store.flush()
    assert host.stats.num_blocks == 2, "the writes resume once the figures say a load pays"
    store.close()
