"""KV-cache policy contract: which requests take part in prefix reuse, how full blocks are identified,
and which free block is given up when a new one is needed.

What the `KVCacheManager` calls, and when:

- ``add_unused(blocks)``: once, at start-up, with every block of the pool. These blocks were never
  used and hold nothing worth keeping; `FreeQueuePolicy` hands them out before any freed block.
- ``push_free(blocks)``: when the last request using some blocks lets go (finished, aborted,
  preempted, moved to another pool). A block with ``block_hash`` set holds a cached prefix that a
  later request may still hit; the manager passes a request's blocks tail first (a prompt's last
  block is the least likely to be shared).
- ``pop_free()``: a block is needed. The manager drops whatever the returned block cached.
- ``remove_free(block)``: a free block got a prefix hit and is in use again.
- ``touch(blocks)``: blocks a request's prefix hit (free or in use), before ``remove_free``; the
  frequency signal of LFU-like policies (default: nothing).
- ``num_free()``, ``is_free(block)``: counts and membership (free = no request holds the block).
- ``should_cache(request)``: whether this request takes part in prefix reuse at all — its prompt is
  looked up in the cache, and its full blocks are published for later requests. The request's public
  fields (``request_id``, ``prompt_token_ids``, ``num_prompt_tokens``, ``priority``,
  ``sampling_params``, ...) are available; see the README's "Plugins" section.
- ``hash_block(parent_hash, token_ids)``: the identity of a full block given its predecessor's hash
  (None: never reuse this block). Hits are always checked against the stored tokens, so a hash
  collision can cost a miss, never a wrong answer.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from typing import TYPE_CHECKING, Hashable, Iterable

import attrs

if TYPE_CHECKING:
    from sagellm_core.request import Request


@attrs.define(eq=False, slots=True)
class Block:
    """One fixed-size block of the KV pool (bookkeeping only; the tensors live in the model runner).

    ``block_hash`` is set while the block's content is findable by later requests (a cached block).
    """

    block_id: int
    ref_count: int = 0
    block_hash: Hashable | None = None
    key: tuple[Hashable | None, tuple[int, ...]] | None = None  # (parent_hash, token_ids): checked on every hit


class KVPolicy(abc.ABC):
    """The contract between a KV pool's manager and a policy (see the module docstring for the
    calling sequence). Implement the free-block methods, or subclass `FreeQueuePolicy`, which keeps
    the free blocks for you and asks only which freed block to give up."""

    name = "abstract"

    def __init__(self, options: object = None) -> None:
        self.options = options

    # ---- reuse decisions (defaults: every request, chained hashes) ------------------------------
    def should_cache(self, request: Request) -> bool:
        """Whether ``request`` looks up cached prefixes and publishes its full blocks. Default: yes."""
        return True

    def hash_block(self, parent_hash: Hashable | None, token_ids: tuple[int, ...]) -> Hashable | None:
        """Identity of a full block given its predecessor's hash; None means "never reuse".

        Default: ``hash((parent_hash, token_ids))``, so equal prefixes give equal chains.
        """
        return hash((parent_hash, token_ids))

    def touch(self, blocks: list[Block]) -> None:
        """A prefix lookup hit ``blocks`` (cached, free or in use). Default: nothing."""

    # ---- free blocks -----------------------------------------------------------------------------
    @abc.abstractmethod
    def add_unused(self, blocks: Iterable[Block]) -> None:
        """Never-used blocks (once, at start-up): nothing cached in them."""

    @abc.abstractmethod
    def push_free(self, blocks: list[Block]) -> None:
        """Blocks whose last user let go, tail first; ``block.block_hash`` set = still cached."""

    @abc.abstractmethod
    def pop_free(self) -> Block:
        """Take the next block to (re)use; raise IndexError when none is free."""

    @abc.abstractmethod
    def remove_free(self, block: Block) -> None:
        """A free block got a prefix hit and is in use again."""

    @abc.abstractmethod
    def num_free(self) -> int:
        """How many blocks are free (unused or freed)."""

    @abc.abstractmethod
    def is_free(self, block: Block) -> bool:
        """Whether ``block`` is free."""


class FreeQueuePolicy(KVPolicy):
    """Keeps the free blocks in two protected containers a subclass builds on:

    - ``self.unused``: never-used blocks (handed out first, lowest block id first; ``unused_ids``
      mirrors it for membership tests);
    - ``self.freed``: freed blocks by id, in the order they were freed (oldest first).

    ``pop_free`` takes an unused block while there is one, so cached content is never given up
    while the pool has room; after that it asks `pick_victim` which freed block to give up.
    """

    def __init__(self, options: object = None) -> None:
        super().__init__(options)
        self.unused: list[Block] = []  # a stack: the lowest block id on top
        self.unused_ids: set[int] = set()
        self.freed: OrderedDict[int, Block] = OrderedDict()

    @abc.abstractmethod
    def pick_victim(self) -> Block:
        """Remove and return one block of ``self.freed`` (never empty when called)."""

    def add_unused(self, blocks: Iterable[Block]) -> None:
        self.unused.extend(blocks)
        self.unused.sort(key=lambda b: -b.block_id)
        self.unused_ids = {b.block_id for b in self.unused}

    def push_free(self, blocks: list[Block]) -> None:
        for block in blocks:
            self.freed[block.block_id] = block

    def pop_free(self) -> Block:
        if self.unused:
            block = self.unused.pop()
            self.unused_ids.discard(block.block_id)
            return block
        if not self.freed:
            raise IndexError("no free KV block")
        return self.pick_victim()

    def remove_free(self, block: Block) -> None:
        del self.freed[block.block_id]  # only freed blocks can be hit: unused ones cache nothing

    def num_free(self) -> int:
        return len(self.unused) + len(self.freed)

    def is_free(self, block: Block) -> bool:
        return block.block_id in self.freed or block.block_id in self.unused_ids
