"""Per-pool KV block manager: allocation, prefix lookup, caching of full blocks, freeing."""

from __future__ import annotations

from typing import Hashable, Sequence

import attrs

from sagellm_core.kv.policy import Block, KVPolicy
from sagellm_core.kv.tiers.base import chain_key, root_key
from sagellm_core.kv.tiers.store import LoadTicket, TierItem, TierStore
from sagellm_core.request import Request


@attrs.frozen
class BelowHit:
    """A prefix block found in a tier below the device pool (``level``: which tier)."""

    key: bytes
    token_ids: tuple[int, ...]
    block_hash: Hashable
    parent: Hashable | None
    level: int


class PrefixHit(list[Block]):
    """A prefix lookup's result: the cached device blocks (the list itself), then ``below``, blocks
    to load from the tiers into fresh device blocks. ``keys``: the tier keys of all of them."""

    def __init__(self, blocks: Sequence[Block] = ()) -> None:
        super().__init__(blocks)
        self.below: list[BelowHit] = []
        self.keys: list[bytes] = []

    @property
    def num_blocks(self) -> int:
        return len(self) + len(self.below)


@attrs.define(eq=False)
class PendingLoad:
    """A waiting request's prefix whose blocks below the pool are being copied into ``fresh``."""

    prefix: PrefixHit
    fresh: list[Block]
    ticket: LoadTicket


def cache_roots(request: Request) -> tuple[Hashable | None, bytes]:
    """The parent of a request's first block: in the device pool's hash chain and in the tier keys.
    A ``cache_salt`` changes both, so requests with different salts share no block."""
    salt = request.params.cache_salt
    return (None if salt is None else ("cache_salt", salt)), root_key(salt)


@attrs.define
class KVStats:
    num_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    prefix_query_tokens: int
    prefix_hit_tokens: int
    tier_hit_tokens: tuple[int, ...] = ()
    """Of ``prefix_hit_tokens``, those loaded from each tier below the pool (top tier first)."""

    @property
    def hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


class KVCacheManager:
    """Owns the block bookkeeping of one KV pool; the scheduler asks it for room, the engine commits."""

    def __init__(self, num_blocks: int, block_size: int, policy: KVPolicy, tiers: TierStore | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.policy = policy
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached: dict[Hashable, Block] = {}
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_hashes: dict[str, list[Hashable | None]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.tiers = tiers
        self.tier_keys: dict[int, bytes] = {}  # cached block id -> its tier key
        self.req_tier_keys: dict[str, list[bytes]] = {}
        self.tier_hit_tokens = [0] * (len(tiers.tiers) if tiers is not None else 0)
        self.loading: dict[str, PendingLoad] = {}
        self.freed_after: dict[int, int] = {}  # block id -> the last step that may use it (tiers' copies)
        policy.add_unused(self.blocks)

    # ---- queries -------------------------------------------------------------------------------
    def num_free_blocks(self) -> int:
        return self.policy.num_free()

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, request: Request) -> PrefixHit:
        """Longest chain of cached full blocks matching the request's tokens (never its last token):
        in the device pool, then continuing down the tiers; none when the policy keeps this request
        out of prefix reuse."""
        hits = PrefixHit()
        if not self.policy.should_cache(request):
            return hits
        max_blocks = (request.num_tokens - 1) // self.block_size
        parent, key = cache_roots(request)
        for i in range(max_blocks):
            chunk = tuple(request.token_slice(i * self.block_size, (i + 1) * self.block_size))
            block_hash = self.policy.hash_block(parent, chunk)
            if block_hash is None:
                break
            if self.tiers is not None:
                key = chain_key(key, chunk)
            block = self.cached.get(block_hash) if not hits.below else None
            if block is not None and block.key == (parent, chunk):
                hits.append(block)
            else:
                level = self.tiers.find_loadable(key, self.block_size) if self.tiers is not None else None
                if level is None:
                    break
                hits.below.append(BelowHit(key, chunk, block_hash, parent, level))
            hits.keys.append(key)
            parent = block_hash
        return hits

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, prefix: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens (after an optional prefix hit). False if full.

        A prefix's blocks found below the device pool start loading into fresh blocks here
        (asynchronously): the request is then `is_loading` until `finish_load` returns its prefix
        (``below`` cut to the blocks that arrived). Without blocks below, the caller advances
        ``num_computed_tokens`` by the prefix's ``num_blocks`` after this call.
        """
        owned = self.req_blocks.get(request.request_id, [])
        below = prefix.below if isinstance(prefix, PrefixHit) else []
        if not prefix and not below and request.num_computed_tokens + num_new_tokens <= len(owned) * self.block_size:
            return True  # fits in the blocks it has (most decode steps)
        prefix = prefix if prefix is not None else []
        computed = request.num_computed_tokens + (len(prefix) + len(below)) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - len(owned) - len(prefix)
        prefix_free = sum(1 for b in prefix if b.ref_count == 0)
        if needed > self.num_free_blocks() - prefix_free:
            return False
        if prefix:
            self.policy.touch(list(prefix))
        for block in prefix:
            if block.ref_count == 0:
                self.policy.remove_free(block)
            block.ref_count += 1
        owned = self.req_blocks.setdefault(request.request_id, owned)
        owned.extend(prefix)
        self.req_hashes.setdefault(request.request_id, []).extend(b.block_hash for b in prefix)
        if self.tiers is not None and isinstance(prefix, PrefixHit):
            self.req_tier_keys.setdefault(request.request_id, []).extend(prefix.keys[: len(prefix)])
        fresh = [self._take_free_block() for _ in range(max(needed, 0))]
        owned.extend(fresh)
        if below and isinstance(prefix, PrefixHit):
            self._start_load(request.request_id, prefix, fresh)
        return True

    def _start_load(self, request_id: str, prefix: PrefixHit, fresh: list[Block]) -> None:
        """Queue the copies of the prefix's blocks found below the pool into the first fresh blocks."""
        assert self.tiers is not None
        items = [TierItem(block.block_id, hit.key, hit.token_ids, self.freed_after.get(block.block_id, -1))
                 for block, hit in zip(fresh, prefix.below)]
        self.loading[request_id] = PendingLoad(prefix, fresh[: len(items)], self.tiers.start_load(items))

    def is_loading(self, request_id: str) -> bool:
        """Whether the request's blocks from below the pool are still on their way (or not yet
        collected by `finish_load`)."""
        return request_id in self.loading

    def finish_load(self, request_id: str, order: bool = False) -> PrefixHit | None:
        """None while the request's load is in flight (never waits); then its prefix hit, ``below``
        cut to the blocks that arrived (their tiers in ``level``), published as cached blocks.
        ``order``: done once the copies are queued, the compute stream ordered after them
        (`TierStore.poll`): for a step planned now."""
        pending = self.loading.get(request_id)
        if pending is None or self.tiers is None or not self.tiers.poll(pending.ticket, order):
            return None
        del self.loading[request_id]
        prefix, ticket = pending.prefix, pending.ticket
        prefix.below[:] = [attrs.evolve(hit, level=level)
                           for hit, level in zip(prefix.below[: ticket.count], ticket.levels)]
        hashes = self.req_hashes[request_id]
        keys = self.req_tier_keys.setdefault(request_id, [])
        for block, hit in zip(pending.fresh, prefix.below):
            if hit.block_hash not in self.cached:
                block.block_hash = hit.block_hash
                block.key = (hit.parent, hit.token_ids)
                self.cached[hit.block_hash] = block
                self.tier_keys[block.block_id] = hit.key
            hashes.append(hit.block_hash)
            keys.append(hit.key)
        return prefix

    def wait_load(self, request_id: str) -> None:
        """Block until the request's load has landed (only when nothing else can run)."""
        pending = self.loading.get(request_id)
        if pending is not None and self.tiers is not None:
            self.tiers.wait(pending.ticket)

    def flush(self) -> None:
        """Queue the copies of evicted blocks down to the tiers (before the step that overwrites
        them is launched)."""
        if self.tiers is not None:
            self.tiers.flush()

    def end_planning(self) -> None:
        """Once per step, when its plan is final: `flush`, and the tiers count the step."""
        if self.tiers is not None:
            self.tiers.end_planning()

    def step_launched(self) -> None:
        """The engine queued the planned step's device work (the tiers' copies wait for it alone)."""
        if self.tiers is not None:
            self.tiers.step_launched()

    def owned_room(self, request: Request) -> int:
        """Tokens the request can still compute in the blocks it owns."""
        return len(self.req_blocks.get(request.request_id, ())) * self.block_size - request.num_computed_tokens

    def allocate_tokens(self, request_id: str, num_tokens: int) -> bool:
        """Give a request that owns no blocks in this pool a fresh table of
        ``blocks_needed(num_tokens)`` blocks (the target of a copy from another pool). False, with
        nothing allocated, when the pool has too few free blocks."""
        if self.req_blocks.get(request_id):
            raise ValueError(f"request {request_id!r} already owns blocks in this KV pool")
        needed = self.blocks_needed(num_tokens)
        if needed > self.num_free_blocks():
            return False
        self.req_blocks[request_id] = [self._take_free_block() for _ in range(needed)]
        self.req_hashes[request_id] = []
        return True

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int,
                             prefix: list[Block] | None = None) -> None:
        """Count a prompt's prefix lookup (for the hit rates in `stats`); ``num_hit_tokens`` counts
        the device and tier hits, ``prefix`` tells which tiers the latter came from."""
        self.prefix_query_tokens += num_prompt_tokens
        self.prefix_hit_tokens += num_hit_tokens
        for hit in prefix.below if isinstance(prefix, PrefixHit) else ():
            self.tier_hit_tokens[hit.level] += self.block_size

    def _take_free_block(self) -> Block:
        block = self.policy.pop_free()
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]  # evicted
                self._write_back(block)
            block.block_hash = None
            block.key = None
        if block.ref_count != 0:
            raise RuntimeError(f"KV block {block.block_id} was free with ref_count {block.ref_count}")
        block.ref_count = 1
        return block

    def _write_back(self, block: Block) -> None:
        key = self.tier_keys.pop(block.block_id, None)
        if key is not None and self.tiers is not None and self.tiers.write_mode == "back" and block.key:
            self.tiers.save(TierItem(block.block_id, key, block.key[1], self.freed_after.get(block.block_id, -1)))

    def cache_full_blocks(self, request: Request) -> None:
        """After a step: make newly completed full blocks findable by later requests (if the policy
        lets this request take part in prefix reuse)."""
        if not self.policy.should_cache(request):
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        hashes = self.req_hashes.setdefault(request.request_id, [])
        keys = self.req_tier_keys.setdefault(request.request_id, []) if self.tiers is not None else None
        root_parent, root_tier_key = cache_roots(request)
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else root_parent
            chunk = tuple(request.token_slice(i * self.block_size, (i + 1) * self.block_size))
            block_hash = self.policy.hash_block(parent, chunk) if (i == 0 or parent is not None) else None
            hashes.append(block_hash)
            key = None
            if keys is not None:
                key = chain_key(keys[-1] if keys else root_tier_key, chunk)
                keys.append(key)
            block = blocks[i]
            if block_hash is not None and block.block_hash is None and block_hash not in self.cached:
                block.block_hash = block_hash
                block.key = (parent, chunk)
                self.cached[block_hash] = block
                if key is not None:
                    self._publish_below(block, key, chunk)

    def _publish_below(self, block: Block, key: bytes, chunk: tuple[int, ...]) -> None:
        assert self.tiers is not None
        self.tier_keys[block.block_id] = key
        if self.tiers.write_mode == "through":
            self.tiers.save(TierItem(block.block_id, key, chunk))

    def persist(self) -> None:
        """Write the cached blocks (device and tiers) to the persistent tier, if any (shutdown)."""
        if self.tiers is not None:
            self.tiers.persist([TierItem(block_id, key, self.blocks[block_id].key[1])  # type: ignore[index]
                                for block_id, key in self.tier_keys.items()])

    # ---- release -------------------------------------------------------------------------------
    def free(self, request_id: str) -> None:
        """Drop a request's blocks (idempotent). Tail blocks are queued for eviction first."""
        pending = self.loading.pop(request_id, None)
        if pending is not None and self.tiers is not None:
            self.tiers.cancel(pending.ticket)
        blocks = self.req_blocks.pop(request_id, None)
        self.req_hashes.pop(request_id, None)
        self.req_tier_keys.pop(request_id, None)
        if not blocks:
            return
        released = []
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"KV block {block.block_id} freed twice")
            if block.ref_count == 0:
                released.append(block)
        if self.tiers is not None:
            mark = self.tiers.steps.mark()
            for block in released:
                self.freed_after[block.block_id] = mark
        self.policy.push_free(released)

    def reset_prefix_cache(self) -> int:
        """Forget the cached blocks no request holds (they stay free, no longer findable; the tiers
        below keep their copies); blocks in use stay cached. Returns how many were forgotten."""
        idle = [block for block in self.cached.values() if block.ref_count == 0]
        for block in idle:
            del self.cached[block.block_hash]
            self.tier_keys.pop(block.block_id, None)
            block.block_hash = None
            block.key = None
        return len(idle)

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
            tier_hit_tokens=tuple(self.tier_hit_tokens),
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
        for block_id in self.tier_keys:
            block = self.blocks[block_id]
            if block.block_hash is None or self.cached.get(block.block_hash) is not block:
                raise AssertionError(f"block {block_id} has a tier key but is not cached")
