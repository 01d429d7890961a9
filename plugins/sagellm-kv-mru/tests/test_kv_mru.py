"""Tests of the MRU KV policy on a real `KVCacheManager` (no model): eviction order, prefix hits while
the pool has room, the prompt-length gate, options, registration."""

from __future__ import annotations

import pytest

import sagellm_kv_mru as mru
from sagellm_core.builtin.kv_policies import PrefixLRUPolicy
from sagellm_core.config import EngineConfig
from sagellm_core.errors import ConfigError
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.kv.policy import KVPolicy
from sagellm_core.plugin_manager import create_plugin_manager
from sagellm_core.plugin_selection import validate_plugin_selection
from sagellm_core.request import Request
from sagellm_core.sampling_params import SamplingParams

BLOCK = 4


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1), 1)


def run(kv: KVCacheManager, rid: str, tokens: list[int]) -> int:
    """Admit a request as the scheduler does, compute its prompt, free it; return its hit tokens."""
    req = request(rid, tokens)
    prefix = kv.find_prefix(req)
    assert kv.allocate(req, len(tokens) - len(prefix) * BLOCK, prefix)
    req.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(req)
    kv.free(rid)
    kv.check_invariants()
    return len(prefix) * BLOCK


SYSTEM = list(range(100, 108))  # two full blocks shared by the "chat" requests


def test_hits_cached_prefixes_while_the_pool_has_room() -> None:
    """An unrelated request in between takes never-used blocks, not the freshly freed cached ones."""
    for policy in (PrefixLRUPolicy(), mru.MRUPolicy()):
        kv = KVCacheManager(32, BLOCK, policy)
        assert run(kv, "a", SYSTEM + [1, 2, 3]) == 0
        assert run(kv, "other", list(range(500, 512))) == 0
        assert run(kv, "b", SYSTEM + [4, 5, 6]) == 8, type(policy).__name__


def test_evicts_the_most_recently_freed_block_when_full() -> None:
    kv = KVCacheManager(4, BLOCK, mru.MRUPolicy())
    run(kv, "old", SYSTEM + [1])            # blocks 0, 1 cached (2 holds the partial tail)
    run(kv, "new", [7, 7, 7, 7, 8])         # block 3 cached, then 2 (the tail, freed last) reused
    run(kv, "filler", [9] * 5)              # needs 2 blocks: MRU gives up the newest freed ones
    assert run(kv, "again_old", SYSTEM + [2]) == 8   # the old prefix survived
    lru = KVCacheManager(4, BLOCK, PrefixLRUPolicy())
    run(lru, "old", SYSTEM + [1])
    run(lru, "new", [7, 7, 7, 7, 8])
    run(lru, "filler", [9] * 5)
    assert run(lru, "again_old", SYSTEM + [2]) == 0  # LRU gave up the oldest prefix instead


def test_short_prompts_take_no_part_in_prefix_reuse() -> None:
    kv = KVCacheManager(32, BLOCK, mru.MRUPolicy(mru.MRUOptions(min_prompt_tokens=10)))
    assert run(kv, "short", SYSTEM + [1]) == 0        # 9 tokens: not published
    assert run(kv, "short_again", SYSTEM + [2]) == 0  # and not looked up
    assert kv.stats().cached_blocks == 0
    assert run(kv, "long", SYSTEM + [1, 2, 3]) == 0   # 11 tokens: published
    assert run(kv, "long_again", SYSTEM + [4, 5, 6]) == 8


def test_options_are_validated_with_their_path() -> None:
    manager = create_plugin_manager(entry_points=False, extra={"kv_mru": mru})
    config = EngineConfig.from_dict({"kv_cache": {"policy": "mru", "policy_options": {"min_prompt_tokens": 64}}})
    selection = validate_plugin_selection(config, manager)
    policy = selection.create_kv_policy()
    assert isinstance(policy, mru.MRUPolicy) and isinstance(policy, KVPolicy)
    assert policy.settings.min_prompt_tokens == 64
    bad = config.evolve(kv_cache={"policy_options": {"min_prompt_tokens": -1}})
    with pytest.raises(ConfigError, match=r"^kv_cache\.policy_options\.min_prompt_tokens: must be >= 0, got -1$"):
        validate_plugin_selection(bad, manager)
