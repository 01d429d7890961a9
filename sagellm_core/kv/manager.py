"""Per-pool KV block manager: allocation, prefix lookup, caching of full blocks, freeing."""

from __future__ import annotations

from typing import Hashable

import attrs

from sagellm_core.kv.policy import Block, KVPolicy
from sagellm_core.request import Request


@attrs.define
class KVStats:
    num_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


class KVCacheManager:
    """Owns the block bookkeeping of one KV pool; the scheduler asks it for room, the engine commits."""

    def __init__(self, num_blocks: int, block_size: int, policy: KVPolicy) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.policy = policy
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached: dict[Hashable, Block] = {}
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[Hashable | None]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        policy.push_free(self.blocks)

    # ---- queries -------------------------------------------------------------------------------
    def num_free_blocks(self) -> int:
        return self.policy.num_free()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request: Request) -> list[Block]:
        """Longest chain of cached full blocks matching the request's tokens (never its last token)."""
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        parent: Hashable | None = None
        for i in range(max_blocks):
            chunk = tuple(request.token_slice(i * self.block_size, (i + 1) * self.block_size))
            block_hash = self.policy.hash_block(parent, chunk)
            block = self.cached.get(block_hash) if block_hash is not None else None
            if block is None or block.key != (parent, chunk):
                break
            hits.append(block)
            parent = block_hash
        return hits

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, prefix: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens (after an optional prefix hit). False if full.

        On success with a prefix, the caller advances ``num_computed_tokens`` by the prefix length.
        """
        owned = self.req_blocks.get(request.request_id, [])
        if not prefix and request.num_computed_tokens + num_new_tokens <= len(owned) * self.block_size:
            return True  # fits in the blocks it has (most decode steps)
        prefix = prefix or []
        computed = request.num_computed_tokens + len(prefix) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - len(owned) - len(prefix)
        prefix_free = sum(1 for b in prefix if b.ref_count == 0)
        if needed > self.num_free_blocks() - prefix_free:
            return False
        for block in prefix:
            if block.ref_count == 0:
                self.policy.remove_free(block)
            block.ref_count += 1
        owned = self.req_blocks.setdefault(request.request_id, owned)
        owned.extend(prefix)
        self.req_hashes.setdefault(request.request_id, []).extend(b.block_hash for b in prefix)
        for _ in range(max(needed, 0)):
            owned.append(self._take_free_block())
        return True

    def allocate_copy_target(self, request_id: str, num_tokens: int) -> bool:
        """Fresh blocks for ``num_tokens`` tokens of KV that will be copied in from another pool
        (strict PD), for a request that holds none here. False (nothing taken) if the pool is short."""
        if self.req_blocks.get(request_id):
            raise RuntimeError(f"request {request_id!r} already holds blocks in this pool")
        needed = self.blocks_needed(num_tokens)
        if needed > self.num_free_blocks():
            return False
        self.req_blocks[request_id] = [self._take_free_block() for _ in range(needed)]
        return True

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_query_tokens += num_prompt_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def _take_free_block(self) -> Block:
        block = self.policy.pop_free()
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]  # evicted
            block.block_hash = None
            block.key = None
        if block.ref_count != 0:
            raise RuntimeError(f"KV block {block.block_id} was free with ref_count {block.ref_count}")
        block.ref_count = 1
        return block

    def cache_full_blocks(self, request: Request) -> None:
        """After a step: make newly completed full blocks findable by later requests."""
        if not self.policy.reuse:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        hashes = self.req_hashes.setdefault(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            chunk = tuple(request.token_slice(i * self.block_size, (i + 1) * self.block_size))
            block_hash = self.policy.hash_block(parent, chunk) if (i == 0 or parent is not None) else None
            hashes.append(block_hash)
            block = blocks[i]
            if block_hash is not None and block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                block.key = (parent, chunk)
                self.cached[block_hash] = block

    # ---- release -------------------------------------------------------------------------------
    def free(self, request_id: str) -> None:
        """Drop a request's blocks (idempotent). Tail blocks are queued for eviction first."""
        blocks = self.req_blocks.pop(request_id, None)
        self.req_hashes.pop(request_id, None)
        if not blocks:
            return
        released = []
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"KV block {block.block_id} freed twice")
            if block.ref_count == 0:
                released.append(block)
        self.policy.push_free(released)

    # ---- introspection -------------------------------------------------------------------------
    def stats(self) -> KVStats:
        free = self.num_free_blocks()
        return KVStats(
            num_blocks=self.num_blocks,
            used_blocks=self.num_blocks - free,
            free_blocks=free,
            cached_blocks=len(self.cached),
            prefix_query_tokens=self.prefix_query_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if bookkeeping is inconsistent (used by tests and debug runs)."""
        refs = [0] * self.num_blocks
        for blocks in self.req_blocks.values():
            for block in blocks:
                refs[block.block_id] += 1
        for block in self.blocks:
            if block.ref_count != refs[block.block_id]:
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count} != {refs[block.block_id]}")
            if (block.ref_count == 0) != self.policy.is_free(block):
                raise AssertionError(f"block {block.block_id}: free-queue membership disagrees with ref_count")
        for block_hash, block in self.cached.items():
            if block.block_hash != block_hash:
                raise AssertionError(f"cached block {block.block_id} has a stale hash")
