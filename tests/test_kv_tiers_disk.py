"""The disk tier's files: evicted files recycled for new blocks (and never while a read may still see
them), torn or stale files detected, reads that do not wait behind the writer, and the read time the
load gate sees when reads run in parallel."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from sagellm_core.config import KVTiersConfig
from sagellm_core.kv.tiers import disk as disk_module
from sagellm_core.kv.tiers import store as store_module
from sagellm_core.kv.tiers.base import KVTier, TierBlock, TierContext, chain_key, root_key
from sagellm_core.kv.tiers.disk import DiskTier
from sagellm_core.kv.tiers.gate import block_load_seconds
from sagellm_core.kv.tiers.host import HostTier
from sagellm_core.kv.tiers.store import BusyTime, TierItem, TierStore, read_job
from test_kv_tiers import StalledDisk

CONTEXT = TierContext((1, 2, 4, 1, 8), torch.device("cpu"), "fp", KVTiersConfig())
TOKENS = (1, 2, 3, 4)


def block(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8)).view(CONTEXT.block_shape)


def key(index: int) -> bytes:
    return chain_key(root_key(None), [index])


def disk_tier(directory: Path, blocks: int) -> DiskTier:
    return DiskTier(CONTEXT, directory, blocks * (CONTEXT.block_bytes + 64 + disk_module.HEADER.size))


def put_evicting(tier: DiskTier, index: int, tokens: tuple[int, ...] = TOKENS) -> None:
    """Store block ``index`` the way the store does in a full tier: the least recently used goes first."""
    while not tier.has_room():
        victim = tier.victim()
        assert victim is not None
        tier.evict(victim)
    assert tier.put(key(index), block(index), tokens)


def read(tier: DiskTier, index: int) -> tuple[tuple[int, ...] | None, np.ndarray]:
    out = np.zeros(CONTEXT.block_bytes, dtype=np.uint8)
    return tier.read_into(key(index), out), out


# ---- recycling ---------------------------------------------------------------------------------------
def test_a_full_tier_overwrites_evicted_files_instead_of_creating_new_ones(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path, 2)
    for index in range(2):
        put_evicting(tier, index)
    tier.ready()
    inode = tier.path(key(0)).stat().st_ino
    put_evicting(tier, 2)  # evicts block 0: its file becomes a spare, block 2 is written over it
    tier.ready()
    assert not tier.path(key(0)).exists() and tier.path(key(2)).stat().st_ino == inode
    assert tier.spare_count() == 0 and sorted(os.listdir(tier.directory)) == sorted(
        tier.path(key(i)).name for i in (1, 2))
    for index in (1, 2):
        tokens, out = read(tier, index)
        assert tokens == TOKENS and np.array_equal(out, block(index).numpy().reshape(-1))
    tier.evict(key(1))
    tier.ready()
    assert tier.spare_count() == 1  # kept for the next block (and for the next engine)
    tier.close()


def test_spares_are_found_again_at_start_up_up_to_the_pool_size(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_module, "SPARE_FILES", 2)
    tier = disk_tier(tmp_path, 4)
    for index in range(4):
        put_evicting(tier, index)
    tier.ready()
    for index in range(4):
        tier.evict(key(index))
    tier.ready()
    assert tier.spare_count() == 2 and len(os.listdir(tier.directory)) == 2  # the others deleted
    tier.close()
    (tier.directory / "broken.spare").write_bytes(b"x")  # any size: a spare is overwritten whole and cut
    reopened = disk_tier(tmp_path, 4)
    assert reopened.spare_count() == 2 and len(os.listdir(reopened.directory)) == 2 and reopened.keys() == []
    put_evicting(reopened, 7)
    reopened.ready()
    assert reopened.spare_count() == 1 and read(reopened, 7)[0] == TOKENS
    assert reopened.path(key(7)).stat().st_size == reopened.file_bytes
    reopened.close()


def test_a_spare_is_not_overwritten_while_a_read_of_its_last_block_runs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that opened block 0's file before it was evicted reads block 0's bytes whole: the
    writer takes another file for the next block meanwhile, and that spare only after the read."""
    tier = disk_tier(tmp_path, 1)
    put_evicting(tier, 0)
    tier.ready()
    inode = tier.path(key(0)).stat().st_ino
    inside, finish = threading.Event(), threading.Event()
    original = disk_module.read_block

    def slow_read(path: Path, *args: Any) -> Any:
        with open(path, "rb") as held:  # the inode stays readable after the rename, as an open fd's does
            inside.set()
            finish.wait()
            return original(Path(f"/proc/self/fd/{held.fileno()}"), *args)

    monkeypatch.setattr(disk_module, "read_block", slow_read)
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(read(tier, 0)))
    reader.start()
    inside.wait()
    monkeypatch.setattr(disk_module, "read_block", original)
    put_evicting(tier, 1)  # block 0 evicted: its file is a spare, but block 0 is being read
    tier.ready()
    assert tier.spare_count() == 1 and tier.path(key(1)).stat().st_ino != inode
    finish.set()
    reader.join()
    tokens, out = result[0]
    assert tokens == TOKENS and np.array_equal(out, block(0).numpy().reshape(-1))
    put_evicting(tier, 2)  # the read is over: block 0's old file is overwritten now
    tier.ready()
    assert tier.path(key(2)).stat().st_ino == inode and read(tier, 2)[0] == TOKENS
    tier.close()


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "new-file"])
def test_a_block_evicted_while_its_file_is_written_leaves_no_file_and_keeps_the_spare(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spare: bool) -> None:
    tier = disk_tier(tmp_path, 1)
    if spare:
        put_evicting(tier, 0)
        tier.ready()
        tier.evict(key(0))
        tier.ready()
        assert tier.spare_count() == 1
    original = disk_module.write_file

    def evicting_write(path: Path, *args: Any) -> None:
        original(path, *args)
        tier.evict(key(1))  # the engine thread gives the block up meanwhile

    monkeypatch.setattr(disk_module, "write_file", evicting_write)
    put_evicting(tier, 1)
    tier.ready()
    assert not tier.contains(key(1)) and not tier.path(key(1)).exists()
    assert tier.spare_count() == int(spare)
    assert all(name.endswith(disk_module.SPARE_SUFFIX) for name in os.listdir(tier.directory))
    tier.close()


# ---- torn and stale files ------------------------------------------------------------------------------
def file_of(index: int, tokens: tuple[int, ...] = TOKENS) -> bytes:
    return disk_module.encode_block(block(index).numpy(), tokens, key(index))


@pytest.mark.parametrize("torn", ["new header, old payload", "old header, new tail", "garbled middle",
                                  "truncated", "zeros"])
def test_a_recycled_file_overwritten_in_part_is_no_block(tmp_path: Path, torn: str) -> None:
    """A crash after the rename may leave a recycled file with only some of its pages written back:
    its checksum (over key, tokens and payload) fails whichever part is new."""
    old, new = file_of(0), file_of(1)
    half = len(new) // 2
    broken = {
        "new header, old payload": new[:100] + old[100:],
        "old header, new tail": old[:half] + new[half:],
        "garbled middle": new[:half] + bytes(8) + new[half + 8:],
        "truncated": new[:half],
        "zeros": bytes(len(new)),
    }[torn]
    path = tmp_path / "block.kvb"
    path.write_bytes(broken)
    out = np.zeros(CONTEXT.block_bytes, dtype=np.uint8)
    assert disk_module.read_block(path, out.data, 4, key(1)) is None


def test_another_blocks_whole_file_under_a_name_is_no_block_even_with_the_same_tokens(tmp_path: Path) -> None:
    """A recycled file renamed before any of its new pages reached the disk holds the evicted block
    whole: the same tokens under another prefix must not pass, so the header names its key."""
    path = tmp_path / "block.kvb"
    path.write_bytes(file_of(0))
    out = np.zeros(CONTEXT.block_bytes, dtype=np.uint8)
    assert disk_module.read_block(path, out.data, 4, key(0)) == TOKENS
    assert disk_module.read_block(path, out.data, 4, key(1)) is None
    forged = bytearray(file_of(0))
    forged[disk_module.HEADER.size - disk_module.KEY_BYTES:disk_module.HEADER.size] = key(1)
    path.write_bytes(bytes(forged))  # the key is under the checksum too
    assert disk_module.read_block(path, out.data, 4, key(1)) is None


def test_a_stale_or_longer_file_under_a_blocks_name_is_deleted_by_the_tier(tmp_path: Path) -> None:
    tier = disk_tier(tmp_path, 2)
    for index in range(2):
        put_evicting(tier, index)
    tier.ready()
    tier.path(key(1)).write_bytes(tier.path(key(0)).read_bytes() + b"tail")
    assert tier.get(key(1)) is None and tier.stats.errors == 1 and not tier.contains(key(1))
    assert tier.get(key(0)) is not None
    tier.ready()  # a file that failed its read is deleted, not recycled (its size may be anything)
    assert not tier.path(key(1)).exists() and tier.spare_count() == 0
    tier.close()


# ---- reads beside the writer ----------------------------------------------------------------------------
def test_a_block_queued_for_its_file_is_read_from_its_host_bytes_without_waiting(tmp_path: Path) -> None:
    tier = StalledDisk(CONTEXT, tmp_path, 1 << 20)
    released: list[bytes] = []
    for index in range(3):
        assert tier.put_deferred(key(index), block(index), TOKENS, None,
                                 lambda index=index: released.append(key(index)))
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(read(tier, 2)))  # last in the writer's queue
    reader.start()
    reader.join(timeout=60)
    try:
        assert not reader.is_alive() and not released, "the read waited for the writer"
        tokens, out = result[0]
        assert tokens == TOKENS and np.array_equal(out, block(2).numpy().reshape(-1))
    finally:
        tier.go.set()
    tier.ready()
    assert released == [key(0), key(1), key(2)] and read(tier, 2)[0] == TOKENS  # now from its file
    tier.close()


# ---- the read time the load gate sees ------------------------------------------------------------------
def clock_of(now: list[float]) -> Callable[[], float]:
    return lambda: now[0]


def test_busy_time_charges_reads_in_flight_together_their_share_of_the_wall_time() -> None:
    now = [0.0]
    busy = BusyTime(clock_of(now))
    first = busy.start()
    now[0] = 4.0
    second = busy.start()  # 0-4: the first alone
    now[0] = 6.0
    third = busy.start()  # 4-6: two
    now[0] = 9.0  # 6-9: three
    charged = [busy.stop(first)]
    now[0] = 13.0  # 9-13: two
    charged += [busy.stop(second), busy.stop(third)]
    assert charged == pytest.approx([4 + 1 + 1, 1 + 1 + 2, 1 + 2])
    assert sum(charged) == pytest.approx(13.0)  # the wall time with at least one read in flight
    now[0] = 20.0  # idle: charged to nobody
    alone = busy.start()
    now[0] = 22.0
    assert busy.stop(alone) == pytest.approx(2.0)


class ParallelTier(KVTier):
    """A tier below the host whose reads wait until ``parties`` of them are in flight; the barrier's
    action moves the fake clock on by ``seconds`` (every read then ends at the same time)."""

    name = "parallel"
    thread_safe_reads = True

    def __init__(self, context: TierContext, keys: dict[bytes, tuple[int, ...]], parties: int,
                 now: list[float], seconds: float) -> None:
        super().__init__(context)
        self.blocks = keys
        self.barrier = threading.Barrier(parties, action=lambda: now.__setitem__(0, now[0] + seconds))

    def contains(self, key: bytes) -> bool:
        return key in self.blocks

    def get(self, key: bytes) -> TierBlock | None:
        return None

    def put(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> bool:
        return False

    def has_room(self) -> bool:
        return False

    def victim(self) -> bytes | None:
        return None

    def evict(self, key: bytes) -> None:
        pass

    def keys(self) -> list[bytes]:
        return list(self.blocks)

    def read_into(self, key: bytes, out: np.ndarray) -> tuple[int, ...] | None:
        self.barrier.wait(timeout=60)
        out.fill(7)
        return self.blocks[key]


def test_parallel_reads_are_charged_the_wall_time_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reads in flight together for 10 s load two blocks in 10 s (not 20: the gate would see half
    the tier's throughput)."""
    now = [100.0]
    monkeypatch.setattr(store_module, "READERS", 2)
    monkeypatch.setattr(store_module.time, "perf_counter", clock_of(now))
    context = TierContext((2, 2, 4, 1, 32), torch.device("cpu"), "fp", KVTiersConfig())
    items = [TierItem(i, chain_key(root_key(None), [i]), (i,)) for i in range(2)]
    below = ParallelTier(context, {item.key: item.token_ids for item in items}, 2, now, 10.0)
    host = HostTier(context, 4 * context.block_bytes)
    store = TierStore([host, below], torch.device("cpu"))
    store.bind(torch.zeros((2, 2, 4, 4, 1, 8)))
    ticket = store.start_load(items)
    store.wait(ticket)
    assert ticket.count == 2
    stats = store.stats()[1]
    assert stats.load_bytes == 2 * context.block_bytes and stats.load_seconds == pytest.approx(10.0)
    host.stats.load_bytes, host.stats.load_seconds = context.block_bytes, 1e-9
    assert block_load_seconds(1, store.tiers) == pytest.approx(5.0, rel=1e-6)  # a block every 5 s
    store.close()


def test_read_job_without_a_busy_time_charges_the_reads_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(store_module.time, "perf_counter", clock_of(now))
    below = ParallelTier(CONTEXT, {b"k": (1,)}, 1, now, 3.0)
    out = np.zeros(CONTEXT.block_bytes, dtype=np.uint8)
    assert read_job(below, b"k", out, None) == ((1,), pytest.approx(3.0))
