"""Built-in KV policies: prefix caching with LRU, LFU, ARC or S3-FIFO eviction, and no reuse."""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable

from sagellm_core.hookspecs import Register, hookimpl
from sagellm_core.kv.policies.arc import ARCPolicy
from sagellm_core.kv.policies.lfu import LFUPolicy
from sagellm_core.kv.policies.s3fifo import S3FIFOPolicy
from sagellm_core.kv.policy import Block, FreeQueuePolicy

if TYPE_CHECKING:
    from sagellm_core.request import Request


class PrefixLRUPolicy(FreeQueuePolicy):
    """Chained hashes over full blocks (token-checked on hit); evict the least recently freed block."""

    name = "prefix_lru"

    def pick_victim(self) -> Block:
        return self.freed.popitem(last=False)[1]


class NoReusePolicy(FreeQueuePolicy):
    """Every request computes its whole prompt; blocks are recycled in free order."""

    name = "no_reuse"

    def should_cache(self, request: Request) -> bool:
        return False

    def hash_block(self, parent_hash: Hashable | None, token_ids: tuple[int, ...]) -> Hashable | None:
        return None

    def pick_victim(self) -> Block:
        return self.freed.popitem(last=False)[1]


@hookimpl
def sagellm_register_kv_policies(register: Register) -> None:
    """Register ``prefix_lru`` (the default), ``no_reuse``, ``lfu``, ``arc`` and ``s3fifo``."""
    register("prefix_lru", PrefixLRUPolicy)
    register("no_reuse", NoReusePolicy)
    register("lfu", LFUPolicy)
    register("arc", ARCPolicy)
    register("s3fifo", S3FIFOPolicy)
