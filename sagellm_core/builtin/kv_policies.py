"""Built-in KV policies: prefix caching with LRU eviction, and no reuse."""

from __future__ import annotations

from typing import Any, Hashable

from sagellm_core.hookspecs import hookimpl
from sagellm_core.kv.policy import KVPolicy


class PrefixLRUPolicy(KVPolicy):
    """Chained hashes over full blocks (token-checked on hit); evict the least recently freed block."""

    name = "prefix_lru"


class NoReusePolicy(KVPolicy):
    """Every request computes its whole prompt; blocks are recycled in free order."""

    name = "no_reuse"

    def hash_block(self, parent_hash: Hashable | None, token_ids: tuple[int, ...]) -> Hashable | None:
        return None

    @property
    def reuse(self) -> bool:
        return False


@hookimpl
def sagellm_register_kv_policies(register: Any) -> None:
    register("prefix_lru", lambda options=None: PrefixLRUPolicy(options))
    register("no_reuse", lambda options=None: NoReusePolicy(options))
