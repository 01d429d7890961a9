"""S3-FIFO (Yang et al., SOSP '23) over the free cached blocks: a small FIFO for blocks cached once,
a main FIFO for blocks hit again, a ghost FIFO of hashes evicted from the small one."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

from sagellm_core.kv.policy import Block, FreeQueuePolicy

SMALL_FRACTION = 0.1
MAX_FREQUENCY = 3


class S3FIFOPolicy(FreeQueuePolicy):
    """A freed block is in the small queue unless its hash was promoted (hit while small, or found
    in the ghost queue); eviction takes the small queue's head while the small queue holds more
    than 10% of the pool, promoting a head that was hit instead of evicting it."""

    name = "s3fifo"

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self.capacity = 1
        self.frequency: dict[Hashable, int] = {}
        self.main: set[Hashable] = set()
        self.ghost: OrderedDict[Hashable, None] = OrderedDict()

    def add_unused(self, blocks: Iterable[Block]) -> None:
        super().add_unused(blocks)
        self.capacity = max(1, len(self.unused))

    def touch(self, blocks: list[Block]) -> None:
        for block in blocks:
            key = block.block_hash
            if key is not None:
                self.frequency[key] = min(MAX_FREQUENCY, self.frequency.get(key, 0) + 1)

    def push_free(self, blocks: list[Block]) -> None:
        for block in blocks:
            key = block.block_hash
            if key is not None and key in self.ghost:
                del self.ghost[key]
                self.main.add(key)
        super().push_free(blocks)

    def pick_victim(self) -> Block:
        while True:
            small = [b for b in self.freed.values() if b.block_hash not in self.main]
            if small and (len(small) > SMALL_FRACTION * self.capacity or len(small) == len(self.freed)):
                block = small[0]
                key = block.block_hash
                if key is not None and self.frequency.get(key, 0) > 0:
                    self.main.add(key)  # hit while in the small queue: promote, move to the tail
                    self.frequency[key] = 0
                    self.freed.move_to_end(block.block_id)
                    continue
                return self._evict(block, ghost=True)
            block = next(b for b in self.freed.values() if b.block_hash in self.main)
            key = block.block_hash
            if self.frequency.get(key, 0) > 0:
                self.frequency[key] -= 1  # type: ignore[index]
                self.freed.move_to_end(block.block_id)
                continue
            return self._evict(block, ghost=False)

    def _evict(self, block: Block, ghost: bool) -> Block:
        del self.freed[block.block_id]
        key = block.block_hash
        if key is not None:
            self.main.discard(key)
            self.frequency.pop(key, None)
            if ghost:
                self.ghost[key] = None
                while len(self.ghost) > self.capacity:
                    self.ghost.popitem(last=False)
        return block
