"""LFU: give up the free cached block whose prefix was used least often (oldest first among ties)."""

from __future__ import annotations

from typing import Hashable

from sagellm_core.kv.policy import Block, FreeQueuePolicy


class LFUPolicy(FreeQueuePolicy):
    """Counts uses per block hash (one per release of a cached block); a hash keeps its count across
    evictions while it is remembered (hashes used once are forgotten beyond ``4 x`` the pool)."""

    name = "lfu"

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self.counts: dict[Hashable, int] = {}
        self.capacity = 0

    def add_unused(self, blocks: object) -> None:
        super().add_unused(blocks)  # type: ignore[arg-type]
        self.capacity = len(self.unused)

    def push_free(self, blocks: list[Block]) -> None:
        for block in blocks:  # one more request used each of them
            if block.block_hash is not None:
                self.counts[block.block_hash] = self.counts.get(block.block_hash, 0) + 1
        super().push_free(blocks)

    def pick_victim(self) -> Block:
        def count(block: Block) -> int:
            return -1 if block.block_hash is None else self.counts.get(block.block_hash, 0)

        victim = min(self.freed.values(), key=count)  # min keeps the first (oldest) of equal counts
        del self.freed[victim.block_id]
        if len(self.counts) > 4 * max(self.capacity, 1):
            self.counts = {h: c for h, c in self.counts.items() if c > 1}
        return victim
