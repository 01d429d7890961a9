"""Eviction policies LFU, ARC and S3-FIFO: the pool's bookkeeping stays sound under each, each keeps
what it should, and the trace replay compares their hit rates."""

from __future__ import annotations

import random
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.kv.policies.trace import builtin_policies, compare, replay
from sagellm_core.kv.policy import KVPolicy
from sagellm_core.plugin_manager import create_plugin_manager
from sagellm_core.request import Request
from sagellm_core.sampling_params import SamplingParams

POLICIES: dict[str, Callable[[], KVPolicy]] = builtin_policies()


def serve(kv: KVCacheManager, rid: str, tokens: list[int]) -> int:
    request = Request(rid, tokens, SamplingParams(max_tokens=1), 1)
    prefix = kv.find_prefix(request)
    assert kv.allocate(request, len(tokens) - len(prefix) * kv.block_size, prefix)
    request.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(request)
    kv.free(rid)
    kv.check_invariants()
    return len(prefix)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=20, deadline=None)
@given(capacity=st.integers(4, 24), seed=st.integers(0, 1000))
def test_bookkeeping_stays_sound(name: str, capacity: int, seed: int) -> None:
    rng = random.Random(seed)
    kv = KVCacheManager(capacity, 2, POLICIES[name]())
    prefixes = [[rng.randrange(30) for _ in range(8)] for _ in range(3)]
    for i in range(40):
        tokens = rng.choice(prefixes)[: rng.randint(0, 8)] + [rng.randrange(30) for _ in range(rng.randint(1, 8))]
        serve(kv, f"r{i}", tokens[: 2 * capacity - 1])
    assert kv.stats().used_blocks == 0 and kv.num_free_blocks() == capacity


def hot_and_scan_trace(rounds: int = 30) -> list[list[int]]:
    """A hot 4-block prefix, then two one-off scans of 6 new blocks, over and over."""
    trace: list[list[int]] = []
    fresh = 1000
    for _ in range(rounds):
        trace.append([1, 2, 3, 4])
        for _ in range(2):
            trace.append(list(range(fresh, fresh + 6)))
            fresh += 6
    return trace


def test_frequency_aware_policies_keep_the_hot_prefix_through_scans() -> None:
    rates = compare(hot_and_scan_trace(), 12, POLICIES)
    for name in ("lfu", "arc", "s3fifo"):
        assert rates[name] > rates["lru"], rates


def test_replay_counts_hits_of_a_repeated_chain() -> None:
    assert replay([[1, 2, 3]] * 4, 8, POLICIES["lru"]()) == pytest.approx(9 / 12)
    assert replay([[1, 2, 3], [4, 5, 6]], 8, POLICIES["lru"]()) == 0.0


def test_policies_are_registered_builtins() -> None:
    names = create_plugin_manager(entry_points=False).registry.names("kv_policy")
    assert {"prefix_lru", "lfu", "arc", "s3fifo", "no_reuse"} <= set(names)
