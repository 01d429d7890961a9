"""Host-memory tier: one preallocated slab of blocks (pinned on CUDA) indexed by slot, least recently
used given up first.

The tier store copies blocks between the device pool and slab slots in batches (`TierStore`); this
class keeps the bookkeeping. A slot is in exactly one state:

* free (``free_slots``);
* holding a findable block (``slots``: key -> slot, oldest use first);
* draining (``draining``): given up to the tier below, whose background writer still reads it; its
  block stays findable here until the writer releases the slot;
* filling (``filling``): reserved for a block being read from a lower tier on a background thread,
  not findable until `publish`.

``events[slot]``: the CUDA event of the last copy-stream operation on the slot; a thread that reads
or writes the slot's bytes outside the copy stream waits for it first (None on the CPU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from sagellm_core.kv.tiers.base import KVTier, TierBlock, TierContext


class HostTier(KVTier):
    """``capacity_bytes // block_bytes`` slots preallocated at start-up (at least one)."""

    name = "host"

    def __init__(self, context: TierContext, capacity_bytes: int) -> None:
        super().__init__(context)
        self.block_bytes = context.block_bytes
        self.capacity = max(1, capacity_bytes // self.block_bytes)
        pin = context.device.type == "cuda"
        self.slab = torch.empty((self.capacity, *context.block_shape), dtype=torch.uint8, pin_memory=pin)
        self.slab_array = self.slab.numpy()
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # oldest use first
        self.tokens: dict[int, tuple[int, ...]] = {}
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self.draining: dict[bytes, int] = {}
        self.filling: set[int] = set()
        self.events: dict[int, Any] = {}
        self._released: list[bytes] = []  # appended by writer threads, collected on the step thread
        self._release_lock = threading.Lock()
        self._release_signal = threading.Condition(self._release_lock)
        self.stats.capacity_blocks = self.capacity
        self.stats.capacity_bytes = self.capacity * context.block_bytes

    # ---- lookups -------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self.slots or key in self.draining

    def slot_of(self, key: bytes) -> int | None:
        """The slot holding ``key`` (findable or draining), or None."""
        slot = self.slots.get(key)
        return slot if slot is not None else self.draining.get(key)

    def touch(self, key: bytes) -> None:
        if key in self.slots:
            self.slots.move_to_end(key)

    def get(self, key: bytes) -> TierBlock | None:
        slot = self.slot_of(key)
        if slot is None:
            return None
        self.wait_slot(slot)
        self.touch(key)
        return TierBlock(self.slab[slot], self.tokens[slot])

    def keys(self) -> list[bytes]:
        return list(self.slots)

    def victim(self) -> bytes | None:
        return next(iter(self.slots), None)

    # ---- slots ---------------------------------------------------------------------------------
    def has_room(self) -> bool:
        self.collect_released()
        return bool(self.free_slots)

    def reserve(self, key: bytes, token_ids: tuple[int, ...]) -> int:
        """Take a free slot for ``key`` (the caller fills it in copy-stream order); it is findable at
        once. Only when `has_room`."""
        slot = self.free_slots.pop()
        self._hold(key, slot, token_ids)
        return slot

    def reserve_filling(self) -> int | None:
        """Take a free slot for a block read from below (not findable until `publish`), or None."""
        if not self.has_room():
            return None
        slot = self.free_slots.pop()
        self.filling.add(slot)
        return slot

    def publish(self, slot: int, key: bytes, token_ids: tuple[int, ...]) -> None:
        """A filled slot holds ``key``'s block now (or frees it when ``key`` is here already)."""
        self.filling.discard(slot)
        if self.contains(key):
            self.free_slots.append(slot)
            return
        self._hold(key, slot, token_ids)

    def _hold(self, key: bytes, slot: int, token_ids: tuple[int, ...]) -> None:
        """``slot`` holds ``key``'s block, findable and most recently used."""
        self.slots[key] = slot
        self.tokens[slot] = token_ids
        self.stats.stores += 1
        self._count()

    def unfill(self, slot: int) -> None:
        """Give back a filling slot whose read failed or was not wanted."""
        self.filling.discard(slot)
        self.free_slots.append(slot)

    def wait_slot(self, slot: int) -> None:
        """Block until the copy-stream operations on ``slot`` have finished (host reads of it)."""
        event = self.events.get(slot)
        if event is not None:
            event.synchronize()

    # ---- giving blocks up ----------------------------------------------------------------------
    def put(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> bool:
        """A block from another tier (host ``data``), copied synchronously."""
        slot = self.reserve(key, token_ids)
        self.wait_slot(slot)
        if data.device.type == "cpu":
            np.copyto(self.slab_array[slot].reshape(-1), data.numpy().reshape(-1))
        else:
            self.slab[slot].view(-1).copy_(data.reshape(-1))
        return True

    def drain(self, key: bytes) -> int:
        """Move ``key`` from the findable blocks to draining (handed to the tier below); its slot."""
        slot = self.slots.pop(key)
        self.draining[key] = slot
        self.stats.evictions += 1
        self._count()
        return slot

    def release_drained(self, key: bytes) -> None:
        """The tier below is done with a drained block (any thread): its slot becomes free."""
        with self._release_signal:
            self._released.append(key)
            self._release_signal.notify_all()

    def collect_released(self) -> None:
        """Free the slots whose drain finished (the step thread)."""
        if not self._released:
            return
        with self._release_lock:
            released, self._released = self._released, []
        for key in released:
            slot = self.draining.pop(key, None)
            if slot is not None:
                self.tokens.pop(slot, None)
                self.free_slots.append(slot)

    def wait_released(self) -> bool:
        """Block until a drained slot is released (False when none is draining)."""
        with self._release_signal:
            if not self.draining:
                return False
            while not self._released:
                self._release_signal.wait()
        self.collect_released()
        return True

    def evict(self, key: bytes) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.tokens.pop(slot, None)
            self.free_slots.append(slot)
            self.stats.evictions += 1
            self._count()

    def ready(self) -> None:
        for event in self.events.values():
            if event is not None:
                event.synchronize()

    def close(self) -> None:
        self.ready()

    def _count(self) -> None:
        self.stats.num_blocks = len(self.slots)
        self.stats.bytes = len(self.slots) * self.block_bytes
