"""Prefix-affinity routing over data-parallel replicas.

A request goes to the replica that was last sent the longest chain of its prompt's full blocks (the
same chained block identity the KV cache uses, so a hit here is a likely hit in that replica's
prefix cache); with no such replica it goes to the least loaded one. The router remembers a bounded
number of block hashes (least recently routed forgotten first): it predicts where a prefix is
cached, it never decides correctness, since each replica still checks its own cache.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import attrs


@attrs.define
class RouteDecision:
    """Where one request went and how many of its prompt tokens the router expects to be cached."""

    replica: int
    matched_tokens: int


@attrs.define
class RouterStats:
    requests: int = 0
    affinity_routed: int = 0
    query_tokens: int = 0
    matched_tokens: int = 0

    @property
    def predicted_hit_rate(self) -> float:
        return self.matched_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixAffinityRouter:
    """Chooses a replica per request; call `finished` when a routed request ends (load accounting)."""

    def __init__(self, num_replicas: int, block_size: int, max_tracked_blocks: int = 1 << 20) -> None:
        if num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        self.block_size = block_size
        self.max_tracked_blocks = max_tracked_blocks
        self.load = [0] * num_replicas
        self.owner: OrderedDict[Hashable, int] = OrderedDict()
        self.stats = RouterStats()

    def block_hashes(self, token_ids: Sequence[int], salt: str | None = None) -> list[Hashable]:
        """Chained identities of the full blocks of ``token_ids`` (never the last token's block,
        which the engine always computes)."""
        hashes: list[Hashable] = []
        parent: Hashable = salt
        for start in range(0, (len(token_ids) - 1) // self.block_size * self.block_size, self.block_size):
            parent = hash((parent, tuple(token_ids[start:start + self.block_size])))
            hashes.append(parent)
        return hashes

    def route(self, token_ids: Sequence[int], salt: str | None = None) -> RouteDecision:
        hashes = self.block_hashes(token_ids, salt)
        matched, replica = 0, None
        for block_hash in hashes:
            owner = self.owner.get(block_hash)
            if owner is None:
                break
            matched, replica = matched + 1, owner
        if replica is None:
            replica = min(range(len(self.load)), key=lambda r: (self.load[r], r))
        else:
            self.stats.affinity_routed += 1
        for block_hash in hashes:
            self.owner[block_hash] = replica
            self.owner.move_to_end(block_hash)
        while len(self.owner) > self.max_tracked_blocks:
            self.owner.popitem(last=False)
        self.load[replica] += 1
        self.stats.requests += 1
        self.stats.query_tokens += len(token_ids)
        self.stats.matched_tokens += matched * self.block_size
        return RouteDecision(replica, matched * self.block_size)

    def finished(self, replica: int) -> None:
        self.load[replica] = max(0, self.load[replica] - 1)
