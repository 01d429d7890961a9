"""The tiers' copies wait for the engine steps that used their blocks, not for all queued compute:
freed blocks are stamped with the last planned step, and a copy waits for the end event of the first
launched step covering the stamp (or everything, where no launched step covers it)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import engine_config
from sagellm_core.builtin.kv_policies import PrefixLRUPolicy
from sagellm_core.config import KVTiersConfig
from sagellm_core.engine.core import LLMEngine
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.kv.tiers.base import TierContext
from sagellm_core.kv.tiers.host import HostTier
from sagellm_core.kv.tiers.steps import StepEvents
from sagellm_core.kv.tiers.store import TierItem, TierStore, latest_step
from sagellm_core.request import Request
from sagellm_core.sampling_params import SamplingParams


class FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_a_copy_waits_for_the_first_launched_step_covering_its_stamp() -> None:
    steps = StepEvents()
    assert steps.mark() == -1 and steps.covering_event(-1) == (True, None), "before any step: nothing to wait for"
    events = []
    for _ in range(3):
        steps.step_planned()
        events.append(FakeEvent())
        steps.step_launched(events[-1])
    assert steps.mark() == 2
    assert steps.covering_event(1) == (True, events[1])
    assert steps.covering_event(None) == (False, None), "no stamp: all queued compute"
    steps.step_planned()  # planned, not yet launched: no event covers it
    assert steps.covering_event(3) == (False, None)
    events[0].done = events[1].done = True
    assert steps.covering_event(1) == (True, None), "steps complete in order: done through step 1"
    assert steps.covering_event(0) == (True, None)
    assert steps.covering_event(2) == (True, events[2])


def test_an_empty_step_is_covered_by_the_next_launched_one() -> None:
    steps = StepEvents()
    steps.step_planned()  # step 0: nothing launched (an empty plan)
    steps.step_planned()
    later = FakeEvent()
    steps.step_launched(later)  # step 1
    assert steps.covering_event(0) == (True, later)


def test_launched_steps_beyond_the_limit_are_waited_for_and_dropped() -> None:
    steps = StepEvents()
    events = []
    for _ in range(70):
        steps.step_planned()
        events.append(FakeEvent())
        steps.step_launched(events[-1])
    assert events[0].done and not events[-1].done and steps.completed_through == 70 - 64 - 1


def test_latest_step_is_unknown_when_any_item_is() -> None:
    items = [TierItem(0, b"a", (1,), 3), TierItem(1, b"b", (2,), -1)]
    assert latest_step(items) == 3 and latest_step([]) == -1
    assert latest_step([*items, TierItem(2, b"c", (3,))]) is None


def manager_with_tiers(num_blocks: int = 4, block_size: int = 2) -> tuple[KVCacheManager, TierStore, list[TierItem]]:
    context = TierContext((1, 2, block_size, 1, 8), torch.device("cpu"), "steps-test", KVTiersConfig())
    store = TierStore([HostTier(context, 8 * context.block_bytes)], torch.device("cpu"))
    saved: list[TierItem] = []
    store.save = saved.append  # type: ignore[method-assign]
    return KVCacheManager(num_blocks, block_size, PrefixLRUPolicy(), store), store, saved


def test_freed_blocks_carry_the_last_planned_step_into_their_copies() -> None:
    kv, store, saved = manager_with_tiers()
    first = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1), 1)
    assert kv.allocate(first, 5)
    first.num_computed_tokens = 5
    kv.cache_full_blocks(first)
    for _ in range(3):
        kv.end_planning()
    kv.free("a")
    assert set(kv.freed_after.values()) == {2}, "freed after three plannings: steps 0-2 may hold the blocks"
    second = Request("b", [9, 9, 9, 9, 9, 9, 9], SamplingParams(max_tokens=1), 1)
    assert kv.allocate(second, 7), "takes every block: the cached ones are evicted"
    assert saved and all(item.after_step == 2 for item in saved), "evicted blocks are copied after step 2 only"
    kv.end_planning()
    assert store.steps.planned == 4


def test_the_engine_counts_planned_steps_with_tiers(tiny_models: dict[str, Path]) -> None:
    engine = LLMEngine(engine_config(tiny_models["llama"], kv_tiers={"host_bytes": 1 << 20}))
    try:
        engine.add_request([5, 6, 7, 8, 9, 10], SamplingParams(temperature=0.0, max_tokens=3))
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        tiers = engine.kv_pools[0].tiers
        assert tiers is not None and 0 < tiers.steps.planned <= steps
        assert set(engine.kv_pools[0].freed_after.values()) <= set(range(tiers.steps.planned))
    finally:
        engine.release()
