"""Data-parallel replicas: prefix-affinity routing sends a shared prefix where it is cached."""

from __future__ import annotations

import random
from pathlib import Path

from sagellm_core.parallel.router import PrefixAffinityRouter
from sagellm_core.sampling_params import SamplingParams


def test_router_prefers_the_replica_holding_the_prefix_else_the_least_loaded() -> None:
    router = PrefixAffinityRouter(num_replicas=2, block_size=4)
    a = router.route(list(range(1, 14)))
    b = router.route(list(range(100, 113)))  # no shared blocks: the idle replica
    assert (a.replica, b.replica) == (0, 1)
    again = router.route(list(range(1, 9)) + [77, 78, 79])  # two shared full blocks with a
    assert again.replica == 0 and again.matched_tokens == 8
    router.finished(0)
    router.finished(0)
    assert router.load == [0, 1]


def test_router_forgets_least_recently_routed_blocks_first() -> None:
    router = PrefixAffinityRouter(num_replicas=2, block_size=2, max_tracked_blocks=2)
    router.route([1, 2, 3, 4, 5])  # two blocks, replica 0
    router.route([9, 9, 8, 8, 7])  # two blocks, replica 1: the first prompt's blocks are forgotten
    assert router.route([1, 2, 3, 4, 6]).matched_tokens == 0


def test_shared_prefix_workload_lands_where_its_prefix_is_cached(tiny_engine_dir: Path) -> None:
    from sagellm_core.parallel.data_parallel import DataParallelLLM

    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 256) for _ in range(32)] for _ in range(4)]
    first = [prefix + [rng.randrange(1, 256) for _ in range(5)] for prefix in prefixes]
    rest = [prefix + [rng.randrange(1, 256) for _ in range(5)] for prefix in prefixes for _ in range(3)]
    rng.shuffle(rest)
    prompts = first + rest
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    config = {"model": {"path": str(tiny_engine_dir), "dtype": "float32"}, "backend": {"name": "cpu"},
              "kv_cache": {"block_size": 4, "num_blocks": 256},
              "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 256}}
    with DataParallelLLM(config=config, data_parallel_size=2) as llm:
        outputs = llm.generate(first, params)  # each prefix is computed (and cached) once
        outputs += llm.generate(rest, params)
        stats = llm.get_stats()
    assert all(len(o.outputs[0].token_ids) == 4 for o in outputs)
    router = stats["router"]
    assert router["affinity_routed"] == len(prompts) - len(prefixes)
    kv = [replica["kv_pools"][0] for replica in stats["replicas"]]
    hit_tokens = sum(pool.prefix_hit_tokens for pool in kv)
    query_tokens = sum(pool.prefix_query_tokens for pool in kv)
    # every request after the first of its prefix group reuses the 32-token prefix (8 blocks of 4)
    assert hit_tokens == 32 * (len(prompts) - len(prefixes))
    print(f"DP=2 shared-prefix hit rate {hit_tokens / query_tokens:.2f} "
          f"(router predicted {router['predicted_hit_rate']:.2f})")
