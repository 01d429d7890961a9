"""Host-memory tier: a fixed slab of blocks (pinned on CUDA), least recently used given up first."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from sagellm_core.kv.tiers.base import KVTier, TierBlock, TierContext


class HostTier(KVTier):
    """``capacity_bytes // block_bytes`` slots preallocated at start-up; copies from a CUDA device
    are queued (``non_blocking``) and `ready` waits for them."""

    name = "host"

    def __init__(self, context: TierContext, capacity_bytes: int) -> None:
        super().__init__(context)
        self.capacity = max(1, capacity_bytes // context.block_bytes)
        pin = context.device.type == "cuda"
        self.slab = torch.empty((self.capacity, *context.block_shape), dtype=torch.uint8, pin_memory=pin)
        self.slab_array = self.slab.numpy()
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # oldest use first
        self.tokens: dict[int, tuple[int, ...]] = {}
        self.free_slots = list(range(self.capacity - 1, -1, -1))
        self._copy_event: torch.cuda.Event | None = None
        self.stats.capacity_blocks = self.capacity
        self.stats.capacity_bytes = self.capacity * context.block_bytes

    def contains(self, key: bytes) -> bool:
        return key in self.slots

    def touch(self, key: bytes) -> None:
        if key in self.slots:
            self.slots.move_to_end(key)

    def get(self, key: bytes) -> TierBlock | None:
        slot = self.slots.get(key)
        if slot is None:
            return None
        self.ready()
        self.slots.move_to_end(key)
        return TierBlock(self.slab[slot], self.tokens[slot])

    def has_room(self) -> bool:
        return bool(self.free_slots)

    def put(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> bool:
        slot = self.free_slots.pop()
        if data.device.type == "cuda":
            self.slab[slot].view(data.shape).copy_(data, non_blocking=True)
            self._copy_event = torch.cuda.Event()
            self._copy_event.record()
        elif data.device.type == "cpu":
            np.copyto(self.slab_array[slot].reshape(data.shape), data.numpy())
        else:
            self.slab[slot].view(data.shape).copy_(data)
        self.slots[key] = slot
        self.tokens[slot] = token_ids
        self.stats.stores += 1
        self._count()
        return True

    def keys(self) -> list[bytes]:
        return list(self.slots)

    def victim(self) -> bytes | None:
        return next(iter(self.slots), None)

    def evict(self, key: bytes) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.tokens.pop(slot, None)
            self.free_slots.append(slot)
            self.stats.evictions += 1
            self._count()

    def ready(self) -> None:
        if self._copy_event is not None:
            self._copy_event.synchronize()
            self._copy_event = None

    def close(self) -> None:
        self.ready()

    def _count(self) -> None:
        self.stats.num_blocks = len(self.slots)
        self.stats.bytes = len(self.slots) * self.context.block_bytes
