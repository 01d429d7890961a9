"""ARC (Megiddo & Modha) over the free cached blocks: recency list T1 (hit once: cached, never hit
since) and frequency list T2, ghost lists B1/B2 of evicted hashes that move the target size of T1."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

from sagellm_core.kv.policy import Block, FreeQueuePolicy


class ARCPolicy(FreeQueuePolicy):
    """``frequent``: hashes hit at least once since cached (T2); a freed block of T1 is given up
    while T1 holds more than ``target`` free blocks; ghost hits adapt ``target``."""

    name = "arc"

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self.capacity = 1
        self.target = 0.0
        self.frequent: set[Hashable] = set()
        self.ghost_recent: OrderedDict[Hashable, None] = OrderedDict()
        self.ghost_frequent: OrderedDict[Hashable, None] = OrderedDict()

    def add_unused(self, blocks: Iterable[Block]) -> None:
        super().add_unused(blocks)
        self.capacity = max(1, len(self.unused))

    def touch(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.block_hash is not None:
                self.frequent.add(block.block_hash)

    def push_free(self, blocks: list[Block]) -> None:
        for block in blocks:
            key = block.block_hash
            if key is None or key in self.frequent:
                continue
            if key in self.ghost_recent:  # evicted from T1 too early: grow T1
                ratio = len(self.ghost_frequent) / len(self.ghost_recent)
                self.target = min(float(self.capacity), self.target + max(1.0, ratio))
                del self.ghost_recent[key]
                self.frequent.add(key)
            elif key in self.ghost_frequent:  # evicted from T2 too early: shrink T1
                ratio = len(self.ghost_recent) / len(self.ghost_frequent)
                self.target = max(0.0, self.target - max(1.0, ratio))
                del self.ghost_frequent[key]
                self.frequent.add(key)
        super().push_free(blocks)

    def pick_victim(self) -> Block:
        recent = [b for b in self.freed.values() if b.block_hash not in self.frequent]
        if recent and (len(recent) > self.target or len(recent) == len(self.freed)):
            victim = recent[0]
            ghosts = self.ghost_recent
        else:
            victim = next(b for b in self.freed.values() if b.block_hash in self.frequent)
            ghosts = self.ghost_frequent
        del self.freed[victim.block_id]
        if victim.block_hash is not None:
            self.frequent.discard(victim.block_hash)
            ghosts[victim.block_hash] = None
            while len(ghosts) > self.capacity:
                ghosts.popitem(last=False)
        return victim
