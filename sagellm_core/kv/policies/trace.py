"""Trace-driven comparison of KV policies: replay requests (each a chain of block ids) through a
real `KVCacheManager` of a given capacity and count prefix hits."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.kv.policy import KVPolicy
from sagellm_core.request import Request
from sagellm_core.sampling_params import SamplingParams

Trace = Sequence[Sequence[int]]
"""One entry per request: the ids of its prompt's full blocks in order (equal prefixes, equal ids)."""


def replay(trace: Trace, capacity: int, policy: KVPolicy) -> float:
    """Block hit rate of ``policy`` on ``trace`` with ``capacity`` device blocks: requests run one
    after another, each looks up its prefix, computes the rest, publishes its blocks and finishes."""
    kv = KVCacheManager(capacity, 1, policy)
    queried = hits = 0
    for index, blocks in enumerate(trace):
        chain = list(blocks)[: capacity - 1]
        request = Request(f"t{index}", chain + [-2], SamplingParams(max_tokens=1), 1)
        prefix = kv.find_prefix(request)
        if not kv.allocate(request, len(chain) + 1 - len(prefix), prefix):
            raise RuntimeError("a trace request does not fit the capacity")
        queried += len(chain)
        hits += len(prefix)
        request.num_computed_tokens = len(chain) + 1
        kv.cache_full_blocks(request)
        kv.free(request.request_id)
    return hits / queried if queried else 0.0


def compare(trace: Trace, capacity: int, policies: Mapping[str, Callable[[], KVPolicy]]) -> dict[str, float]:
    """Hit rate per policy name (each gets a fresh policy object)."""
    return {name: replay(trace, capacity, factory()) for name, factory in policies.items()}


def builtin_policies() -> dict[str, Callable[[], KVPolicy]]:
    from sagellm_core.builtin.kv_policies import PrefixLRUPolicy
    from sagellm_core.kv.policies.arc import ARCPolicy
    from sagellm_core.kv.policies.lfu import LFUPolicy
    from sagellm_core.kv.policies.s3fifo import S3FIFOPolicy

    return {"lru": PrefixLRUPolicy, "lfu": LFUPolicy, "arc": ARCPolicy, "s3fifo": S3FIFOPolicy}
