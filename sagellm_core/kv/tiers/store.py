"""The tier stack under one device KV pool: blocks the pool evicts move down, prefix hits below the
pool are copied up into freshly allocated device blocks.

On the CPU, copies go through numpy (one memcpy per layer and K/V, outside torch's intra-op thread
pool, which costs more than the copy on a busy host). Copies are queued on the device in stream order at the moment the scheduler plans them, so a
block written back is read before any later step overwrites it, and a loaded block is in place
before the step that reads it. On CUDA loads run on a side stream: pinned staging, one host-to-device
copy per batch, a scatter into the pool, and an event the compute stream waits on.
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

import attrs
import numpy as np
import torch

from sagellm_core.kv.tiers.base import KVTier, TierStats


@attrs.frozen
class TierItem:
    """A device block and the tier key and token ids of the prefix block it holds (or will hold)."""

    block_id: int
    key: bytes
    token_ids: tuple[int, ...]


class TierStore:
    """Tiers top (fastest) to bottom; ``write_mode`` ``back``: a block moves down when the device
    pool evicts it; ``through``: when it becomes a full cached block."""

    def __init__(self, tiers: Sequence[KVTier], device: torch.device, write_mode: str = "back") -> None:
        self.tiers = list(tiers)
        self.device = device
        self.write_mode = write_mode
        self.pool: torch.Tensor | None = None
        self._pool_array: np.ndarray | None = None  # the CPU pool, for copies that skip torch's thread pool
        self._stream: torch.cuda.Stream | None = None
        self._staging: torch.Tensor | None = None
        self._staging_free: torch.cuda.Event | None = None
        self._timings: list[tuple[torch.cuda.Event, torch.cuda.Event, int, KVTier]] = []

    def bind(self, pool: torch.Tensor) -> None:
        """The device pool ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, seen
        as bytes ``[num_layers * 2, num_blocks, block bytes per layer and K/V]`` (a block: one row per
        layer and K/V, each contiguous)."""
        layers, kv, num_blocks = pool.shape[:3]
        self.pool = pool.view(torch.uint8).view(layers * kv, num_blocks, -1)
        self._pool_array = self.pool.numpy() if self.pool.device.type == "cpu" else None

    # ---- lookups -------------------------------------------------------------------------------
    def find(self, key: bytes) -> int | None:
        """The level of the highest tier holding ``key`` (marked recently used), or None."""
        for level, tier in enumerate(self.tiers):
            if tier.contains(key):
                tier.touch(key)
                return level
        return None

    # ---- down ----------------------------------------------------------------------------------
    def save(self, item: TierItem) -> None:
        """Copy a device block into the top tier (nothing when it is there already)."""
        tick = time.perf_counter()
        self._store(0, item.key, self._device_block(item.block_id), item.token_ids)
        self.tiers[0].stats.save_seconds += time.perf_counter() - tick

    def _device_block(self, block_id: int) -> torch.Tensor:
        if self.pool is None:
            raise RuntimeError("the tier store is not bound to a device pool")
        return self.pool[:, block_id]

    def _store(self, level: int, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> None:
        tier = self.tiers[level]
        if tier.contains(key):
            tier.touch(key)
            return
        self._make_room(level)
        if tier.has_room():
            tier.put(key, data, token_ids)

    def _make_room(self, level: int) -> None:
        tier = self.tiers[level]
        while not tier.has_room():
            key = tier.victim()
            if key is None:
                return
            if level + 1 < len(self.tiers):
                block = tier.get(key)
                if block is not None:
                    self._store(level + 1, key, block.data, block.token_ids)
            tier.evict(key)

    def persist(self, device_items: Sequence[TierItem]) -> None:
        """Shutdown: write the device pool's cached blocks and every block of the tiers above the
        first persistent tier into it, so a restarted engine finds them."""
        target = next((i for i, tier in enumerate(self.tiers) if tier.persistent), None)
        if target is None or self.pool is None:
            return
        for item in device_items:
            self._store(target, item.key, self._device_block(item.block_id).cpu(), item.token_ids)
        for tier in self.tiers[:target]:
            tier.ready()
            for key in tier.keys():
                block = tier.get(key)
                if block is not None:
                    self._store(target, key, block.data, block.token_ids)

    # ---- up ------------------------------------------------------------------------------------
    def load(self, items: Sequence[TierItem]) -> int:
        """Copy the blocks of ``items`` (a chain, in order) from the tiers into their device blocks;
        returns how many leading items were loaded (a block missing, corrupt or holding other tokens
        ends the chain there)."""
        found: list[tuple[int, torch.Tensor, KVTier]] = []
        for item in items:
            level = self.find(item.key)
            block = self.tiers[level].get(item.key) if level is not None else None
            if block is not None and block.token_ids != item.token_ids:
                tier = self.tiers[level]  # type: ignore[index]
                tier.stats.errors += 1
                tier.evict(item.key)
                block = None
            if block is None or level is None:
                break
            found.append((item.block_id, block.data, self.tiers[level]))
        for _, run in itertools.groupby(found, key=lambda entry: id(entry[2])):
            self._copy_up(list(run))
        for _, _, tier in found:
            tier.stats.hits += 1
            tier.stats.loads += 1
        return len(found)

    def _copy_up(self, found: list[tuple[int, torch.Tensor, KVTier]]) -> None:
        if self.pool is None:
            raise RuntimeError("the tier store is not bound to a device pool")
        nbytes = sum(int(data.numel()) for _, data, _ in found)
        tier = found[0][2]
        if self._pool_array is not None:
            tick = time.perf_counter()
            rows = self._pool_array.shape[0]
            for block_id, data, _ in found:
                np.copyto(self._pool_array[:, block_id], data.numpy().reshape(rows, -1))
            tier.stats.load_seconds += time.perf_counter() - tick
            tier.stats.load_bytes += nbytes
            return
        if self.device.type != "cuda":  # other accelerators: plain blocking copies
            tick = time.perf_counter()
            for block_id, data, _ in found:
                self.pool[:, block_id].copy_(data.view(self.pool.shape[0], -1))
            tier.stats.load_seconds += time.perf_counter() - tick
            tier.stats.load_bytes += nbytes
            return
        self._copy_up_cuda(found, nbytes, tier)

    def _copy_up_cuda(self, found: list[tuple[int, torch.Tensor, KVTier]], nbytes: int, tier: KVTier) -> None:
        assert self.pool is not None
        count = len(found)
        if self._staging_free is not None:
            self._staging_free.synchronize()  # the previous batch's host-to-device copy read the staging
        if self._staging is None or self._staging.shape[0] < count:
            self._staging = torch.empty((count, *found[0][1].shape), dtype=torch.uint8, pin_memory=True)
        staging = self._staging[:count]
        torch.stack([data for _, data, _ in found], out=staging)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # the fresh blocks' last readers have run
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            start.record()
            blocks = staging.to(self.device, non_blocking=True)
            index = torch.tensor([block_id for block_id, _, _ in found], device="cpu").to(self.device,
                                                                                         non_blocking=True)
            self.pool[:, index] = blocks.view(count, self.pool.shape[0], -1).transpose(0, 1)
            end.record()
        compute.wait_event(end)
        self._staging_free = end
        self._timings.append((start, end, nbytes, tier))

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> list[TierStats]:
        pending = []
        for start, end, nbytes, tier in self._timings:
            if end.query():
                tier.stats.load_seconds += start.elapsed_time(end) / 1000.0
                tier.stats.load_bytes += nbytes
            else:
                pending.append((start, end, nbytes, tier))
        self._timings = pending
        return [attrs.evolve(tier.stats) for tier in self.tiers]

    def ready(self) -> None:
        """Wait until every tier's queued copies and writes have landed."""
        for tier in self.tiers:
            tier.ready()

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
