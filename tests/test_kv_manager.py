"""KV block bookkeeping: exact block ids, prefix reuse, eviction order, and randomized leak checks."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_core.builtin.kv_policies import NoReusePolicy, PrefixLRUPolicy
from sagellm_core.builtin.schedulers import FCFSScheduler, PriorityScheduler
from sagellm_core.config import SchedulerConfig
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.kv.policies.arc import ARCPolicy
from sagellm_core.kv.policies.lfu import LFUPolicy
from sagellm_core.kv.policies.s3fifo import S3FIFOPolicy
from sagellm_core.kv.policy import Block, FreeQueuePolicy, KVPolicy
from sagellm_core.request import Request, RequestStatus
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.schedulers.pd import PDOptions, PDScheduler


def make_request(rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens), max_tokens)


def test_allocation_uses_exact_block_ids_and_frees_tail_first() -> None:
    kv = KVCacheManager(8, 4, PrefixLRUPolicy())
    a = make_request("a", list(range(10)))
    assert kv.allocate(a, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    b = make_request("b", list(range(100, 105)))
    assert kv.allocate(b, 5)
    assert kv.block_ids("b") == [3, 4]
    kv.free("a")
    # freed tail-first: block 2 is evicted before 1 and 0, after the never-used 5, 6, 7
    c = make_request("c", list(range(200, 224)))
    assert kv.allocate(c, 24)
    assert kv.block_ids("c") == [5, 6, 7, 2, 1, 0]
    kv.check_invariants()


def test_prefix_hit_is_token_checked_and_refcounted() -> None:
    kv = KVCacheManager(8, 4, PrefixLRUPolicy())
    a = make_request("a", list(range(12)))
    kv.allocate(a, 12)
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    prefix = kv.find_prefix(b)
    assert [blk.block_id for blk in prefix] == [0, 1]
    assert kv.allocate(b, 3, prefix)
    assert kv.block_ids("b")[:2] == [0, 1] and kv.blocks[0].ref_count == 2
    c = make_request("c", [0, 1, 2, 7] + list(range(4, 12)))  # first block differs -> no hit
    assert kv.find_prefix(c) == []
    kv.free("a")
    kv.free("b")
    kv.check_invariants()
    assert kv.stats().used_blocks == 0 and kv.stats().cached_blocks == 3


def test_reset_prefix_cache_forgets_idle_blocks_and_keeps_those_in_use() -> None:
    kv = KVCacheManager(8, 4, PrefixLRUPolicy())
    assert _run(kv, "a", list(range(12))) == 0
    held = make_request("held", list(range(100, 109)))
    kv.allocate(held, 9)
    held.num_computed_tokens = 9
    kv.cache_full_blocks(held)
    assert kv.reset_prefix_cache() == 3  # a's three idle blocks; held's two stay cached
    kv.check_invariants()
    assert kv.stats().cached_blocks == 2 and kv.stats().free_blocks == 5
    assert _run(kv, "again", list(range(12))) == 0  # recomputed
    assert _run(kv, "held-prefix", list(range(100, 108)) + [1, 2]) == 8
    kv.free("held")
    kv.check_invariants()


def test_never_hits_the_last_token_so_one_token_is_always_computed() -> None:
    kv = KVCacheManager(8, 4, PrefixLRUPolicy())
    a = make_request("a", list(range(8)))
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    same = make_request("b", list(range(8)))
    assert len(kv.find_prefix(same)) == 1  # 7 reusable tokens -> one full block


def test_no_reuse_policy_never_caches() -> None:
    kv = KVCacheManager(4, 4, NoReusePolicy())
    a = make_request("a", list(range(8)))
    kv.allocate(a, 8)
    a.num_computed_tokens = 8
    kv.cache_full_blocks(a)
    assert kv.stats().cached_blocks == 0
    assert kv.find_prefix(make_request("b", list(range(9)))) == []


def test_free_is_idempotent_and_double_free_of_a_block_is_detected() -> None:
    kv = KVCacheManager(4, 4, PrefixLRUPolicy())
    a = make_request("a", list(range(4)))
    kv.allocate(a, 4)
    kv.free("a")
    kv.free("a")
    kv.check_invariants()
    kv.blocks[0].ref_count = 0
    kv.req_blocks["x"] = [kv.blocks[0]]
    try:
        kv.free("x")
    except RuntimeError as exc:
        assert "freed twice" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("double free not detected")


SCHEDULERS = {
    "fcfs": lambda cfg: FCFSScheduler(cfg),
    "priority": lambda cfg: PriorityScheduler(cfg),
    "pd_strict": lambda cfg: PDScheduler(cfg, PDOptions(mode="strict")),
    "pd_time_share": lambda cfg: PDScheduler(cfg, PDOptions(mode="time_share", max_decode_steps=2)),
    "pd_hybrid": lambda cfg: PDScheduler(cfg, PDOptions(mode="hybrid")),
}


POLICIES: dict[str, type[KVPolicy]] = {"prefix_lru": PrefixLRUPolicy, "no_reuse": NoReusePolicy, "lfu": LFUPolicy,
                                        "arc": ARCPolicy, "s3fifo": S3FIFOPolicy}


@settings(max_examples=60, deadline=None)
@given(
    scheduler_name=st.sampled_from(sorted(SCHEDULERS)),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 8),
    reuse=st.sampled_from(["prefix_lru", "no_reuse", "lfu", "arc", "s3fifo"]),
    seed=st.integers(0, 10_000),
    num_requests=st.integers(1, 14),
)
def test_randomized_workloads_leak_nothing(scheduler_name: str, num_blocks: int, block_size: int, budget: int,
                                           max_seqs: int, reuse: str, seed: int, num_requests: int) -> None:
    """Simulated steps with random prompts, shared prefixes, aborts and preemption: every request ends
    exactly once, reference counts stay consistent, and in the end every block is free."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget)
    scheduler = SCHEDULERS[scheduler_name](config)
    pools = [KVCacheManager(num_blocks, block_size, POLICIES[reuse]()) for _ in range(scheduler.num_kv_pools)]
    scheduler.bind(pools)
    capacity = min(p.num_blocks for p in pools) * block_size
    base = [rng.randrange(50) for _ in range(64)]
    pending = []
    for i in range(num_requests):
        max_tokens = rng.randint(1, 6)
        length = rng.randint(1, max(1, min(30, capacity - max_tokens)))
        tokens = base[: rng.randint(0, length)]
        tokens += [rng.randrange(50) for _ in range(length - len(tokens))]
        pending.append(make_request(f"r{i}", tokens, max_tokens))
    finished: list[str] = []
    steps = 0
    while pending or scheduler.has_work():
        steps += 1
        assert steps < 5000, "no progress"
        if pending and rng.random() < 0.5:
            scheduler.add(pending.pop(0))
        if scheduler.running and rng.random() < 0.05:
            victim = rng.choice(scheduler.running + scheduler.waiting)
            victim.status = RequestStatus.FINISHED_ABORTED
            scheduler.finish(victim)
            finished.append(victim.request_id)
        plan = scheduler.schedule()
        seen = [c.request.request_id for c in plan.chunks]
        assert len(seen) == len(set(seen)), "a request was scheduled twice in one step"
        for chunk in plan.chunks:
            request = chunk.request
            assert chunk.num_tokens >= 1 and request.status is RequestStatus.RUNNING
            assert len(pools[request.pool].block_ids(request.request_id)) * block_size >= (
                request.num_computed_tokens + chunk.num_tokens)
            completes = request.num_computed_tokens + chunk.num_tokens == request.num_tokens
            request.num_computed_tokens += chunk.num_tokens
            if completes:
                request.output_token_ids.append(rng.randrange(50))
        scheduler.after_step(plan)
        for chunk in plan.chunks:
            request = chunk.request
            if request.num_output_tokens >= request.max_tokens and not request.is_finished:
                request.status = RequestStatus.FINISHED_LENGTH
                scheduler.finish(request)
                finished.append(request.request_id)
        for pool in pools:
            pool.check_invariants()
    assert sorted(finished) == sorted(f"r{i}" for i in range(num_requests))
    for pool in pools:
        assert pool.stats().used_blocks == 0
        pool.check_invariants()


def _run(kv: KVCacheManager, rid: str, tokens: list[int]) -> int:
    """Admit, compute and free one request as the scheduler does; return its prefix-hit tokens."""
    req = make_request(rid, tokens)
    prefix = kv.find_prefix(req)
    assert kv.allocate(req, len(tokens) - len(prefix) * kv.block_size, prefix)
    req.num_computed_tokens = len(tokens)
    kv.cache_full_blocks(req)
    kv.free(rid)
    kv.check_invariants()
    return len(prefix) * kv.block_size


class OneQueueMRU(KVPolicy):
    """MRU written against a single free queue that mixes never-used and freed blocks (what the
    contract used to hand a policy): it gives up fresh cached blocks while unused ones wait."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: OrderedDict[int, Block] = OrderedDict()

    def add_unused(self, blocks: Iterable[Block]) -> None:
        self.push_free(list(blocks))

    def push_free(self, blocks: list[Block]) -> None:
        for block in blocks[::-1]:
            self.queue[block.block_id] = block

    def pop_free(self) -> Block:
        return self.queue.popitem(last=True)[1]

    def remove_free(self, block: Block) -> None:
        del self.queue[block.block_id]

    def num_free(self) -> int:
        return len(self.queue)

    def is_free(self, block: Block) -> bool:
        return block.block_id in self.queue


class FreeQueueMRU(FreeQueuePolicy):
    def push_free(self, blocks: list[Block]) -> None:
        super().push_free(blocks[::-1])

    def pick_victim(self) -> Block:
        return self.freed.popitem(last=True)[1]


def test_unused_blocks_are_handed_out_before_cached_ones() -> None:
    shared = list(range(100, 108))
    results = {}
    for name, policy in (("one_queue", OneQueueMRU()), ("free_queue", FreeQueueMRU()), ("lru", PrefixLRUPolicy())):
        kv = KVCacheManager(32, 4, policy)
        _run(kv, "a", shared + [1, 2, 3])
        _run(kv, "unrelated", list(range(500, 512)))
        results[name] = _run(kv, "b", shared + [4, 5, 6])
    assert results == {"one_queue": 0, "free_queue": 8, "lru": 8}


def test_should_cache_sees_the_request() -> None:
    class LongPromptsOnly(PrefixLRUPolicy):
        def should_cache(self, request: Request) -> bool:
            return request.num_prompt_tokens > 10

    kv = KVCacheManager(32, 4, LongPromptsOnly())
    shared = list(range(100, 108))
    assert _run(kv, "short", shared + [1]) == 0 and kv.stats().cached_blocks == 0
    assert _run(kv, "long", shared + [1, 2, 3]) == 0 and kv.stats().cached_blocks == 2
    assert _run(kv, "short_again", shared + [2]) == 0  # a short prompt does not even look
    assert _run(kv, "long_again", shared + [4, 5, 6]) == 8


def test_policies_are_abstract_contracts() -> None:
    for abstract in (KVPolicy, FreeQueuePolicy):
        try:
            abstract()  # type: ignore[abstract]
        except TypeError as exc:
            assert "abstract" in str(exc)
        else:  # pragma: no cover
            raise AssertionError(f"{abstract.__name__} must not be instantiable")


def test_allocate_tokens_gives_a_fresh_table_or_nothing() -> None:
    kv = KVCacheManager(4, 4, PrefixLRUPolicy())
    assert kv.allocate_tokens("copy", 9)
    assert kv.block_ids("copy") == [0, 1, 2]
    assert not kv.allocate_tokens("other", 5)  # needs 2, 1 free: nothing taken
    assert kv.block_ids("other") == [] and kv.num_free_blocks() == 1
    try:
        kv.allocate_tokens("copy", 1)
    except ValueError as exc:
        assert "already owns blocks" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a second table for the same request must be refused")
    kv.free("copy")
    kv.check_invariants()
    assert kv.num_free_blocks() == 4
