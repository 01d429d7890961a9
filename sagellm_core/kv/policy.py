"""KV-cache policy contract: which full blocks may be reused, and in which order free blocks are evicted."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import attrs


@attrs.define(eq=False, slots=True)
class Block:
    """One fixed-size block of the KV pool (bookkeeping only; the tensors live in the model runner)."""

    block_id: int
    ref_count: int = 0
    block_hash: Hashable | None = None
    key: tuple | None = None  # (parent_hash, token_ids): checked on every hit


class KVPolicy:
    """Base policy: LRU free queue, chained block hashes.

    NOTE: the free queue's order is the eviction order: ``pop_free`` takes the block freed longest ago.
    Subclasses override ``hash_block`` (return None to never reuse a block) and/or the queue methods.
    """

    name = "base"

    def __init__(self, options: object = None) -> None:
        self.options = options
        self._free: OrderedDict[int, Block] = OrderedDict()

    def hash_block(self, parent_hash: Hashable | None, token_ids: tuple[int, ...]) -> Hashable | None:
        """Identity of a full block given its predecessor's hash; None means "never reuse"."""
        return hash((parent_hash, token_ids))

    def push_free(self, blocks: list[Block]) -> None:
        """Blocks whose last user let go, in the order they should be evicted (first = sooner)."""
        for block in blocks:
            self._free[block.block_id] = block

    def pop_free(self) -> Block:
        """Take the next block to (re)use; raises IndexError when none is free."""
        if not self._free:
            raise IndexError("no free KV block")
        return self._free.popitem(last=False)[1]

    def remove_free(self, block: Block) -> None:
        """A free block got a prefix hit and is in use again."""
        del self._free[block.block_id]

    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, block: Block) -> bool:
        return block.block_id in self._free

    @property
    def reuse(self) -> bool:
        return True
