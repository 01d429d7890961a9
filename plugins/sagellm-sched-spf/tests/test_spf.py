"""Tests of the SPF scheduler plugin: the ordering (fake requests, no engine), options, registration."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sagellm_sched_spf as spf
from sagellm_core.config import SchedulerConfig, structure_options
from sagellm_core.errors import ConfigError
from sagellm_core.plugin_manager import create_plugin_manager


@attrs.define
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    arrival_order: int = 0  # read by PolicyScheduler's tie-breaks, not by the SPF ordering


def req(request_id: str, prompt_len: int, arrival: float) -> FakeRequest:
    return FakeRequest(request_id, [7] * prompt_len, arrival)


def order(requests: list[FakeRequest], now: float, aging: float) -> list[str]:
    return [r.request_id for r in sorted(requests, key=lambda r: spf.spf_key(r, now, aging))]


# ---- ordering -------------------------------------------------------------------------------------
def test_shorter_prompt_first_without_aging() -> None:
    requests = [req("long", 500, 0.0), req("short", 10, 5.0), req("mid", 100, 1.0)]
    assert order(requests, now=6.0, aging=0.0) == ["short", "mid", "long"]


def test_long_prompt_overtakes_after_waiting_long_enough() -> None:
    long, short = req("long", 1000, 0.0), req("short", 100, 10.0)
    # 900 tokens of difference at 100 tokens/s: the long prompt leads once it has 9 s more waiting.
    assert order([long, short], now=10.0, aging=50.0) == ["short", "long"]  # 1000-500 > 100-0
    assert order([long, short], now=10.0, aging=100.0) == ["long", "short"]  # 1000-1000 < 100-0


def test_equal_keys_break_ties_by_arrival_then_id() -> None:
    # keys: 300 - 10*20 = 100 and 100 - 10*0 = 100 -> the earlier arrival wins.
    assert order([req("b", 100, 20.0), req("a", 300, 0.0)], now=20.0, aging=10.0) == ["a", "b"]
    assert order([req("y", 5, 1.0), req("x", 5, 1.0)], now=1.0, aging=0.0) == ["x", "y"]


def test_key_value() -> None:
    assert spf.spf_key(req("r", 64, 2.0), now=5.0, aging=4.0) == (64 - 12.0, 2.0, "r")


@given(
    st.lists(st.tuples(st.integers(1, 4096), st.floats(0, 1e4)), min_size=1, max_size=12),
    st.floats(0, 1e3), st.floats(0, 1e4), st.floats(0, 1e4),
)
def test_order_does_not_depend_on_now(specs: list[tuple[int, float]], aging: float, now_a: float,
                                      now_b: float) -> None:
    """Why the scheduler may evaluate keys at a fixed reference time instead of reading a clock."""
    requests = [req(f"r{i}", length, arrival) for i, (length, arrival) in enumerate(specs)]
    # Compare with integer-valued times so float rounding of the shared term cannot flip near-ties.
    now_a, now_b = float(round(now_a)), float(round(now_b))
    requests = [attrs.evolve(r, arrival_time=float(round(r.arrival_time))) for r in requests]
    assert order(requests, now_a, float(round(aging))) == order(requests, now_b, float(round(aging)))


# ---- the scheduler class ----------------------------------------------------------------------------
def test_scheduler_waiting_key_and_preemption_victim() -> None:
    scheduler = spf.SPFScheduler(SchedulerConfig(), spf.SPFOptions(aging_tokens_per_second=100.0))
    requests = [req("long", 1000, 0.0), req("short", 100, 10.0), req("older_mid", 600, 2.0)]
    admitted = [r.request_id for r in sorted(requests, key=scheduler.waiting_key)]
    # keys relative to now=10: long 0, short 100, older_mid 600-800 = -200
    assert admitted == ["older_mid", "long", "short"]
    assert scheduler.preemption_victim(requests).request_id == "short"


def test_scheduler_defaults_options() -> None:
    assert spf.SPFScheduler(SchedulerConfig()).aging == spf.SPFOptions().aging_tokens_per_second


def test_engine_scheduler_admits_shortest_first() -> None:
    """Through the engine's real `PolicyScheduler.schedule` with a KV pool: one slot, shortest wins."""
    from sagellm_core.builtin.kv_policies import PrefixLRUPolicy
    from sagellm_core.kv.manager import KVCacheManager
    from sagellm_core.request import Request
    from sagellm_core.sampling_params import SamplingParams

    scheduler = spf.SPFScheduler(SchedulerConfig(max_num_seqs=1), spf.SPFOptions(aging_tokens_per_second=0.0))
    scheduler.bind([KVCacheManager(num_blocks=64, block_size=16, policy=PrefixLRUPolicy())])
    for request_id, length in (("long", 200), ("short", 20), ("mid", 90)):
        scheduler.add(Request(request_id, list(range(length)), SamplingParams(), max_tokens=4))
    output = scheduler.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in output.chunks] == [("short", 20)]


# ---- options and registration ---------------------------------------------------------------------
def test_options_validate_with_field_paths() -> None:
    assert structure_options(spf.SPFOptions, {}, "scheduler.options") == spf.SPFOptions()
    assert structure_options(spf.SPFOptions, {"aging_tokens_per_second": 3}, "scheduler.options") == \
        spf.SPFOptions(3.0)
    with pytest.raises(ConfigError, match=r"scheduler\.options\.aging_tokens_per_second: must be a finite"):
        structure_options(spf.SPFOptions, {"aging_tokens_per_second": -1}, "scheduler.options")
    with pytest.raises(ConfigError, match=r"scheduler\.options\.aging_tokens_per_second: must be a finite"):
        structure_options(spf.SPFOptions, {"aging_tokens_per_second": float("inf")}, "scheduler.options")
    with pytest.raises(ConfigError, match=r"scheduler\.options\.aging: unknown key"):
        structure_options(spf.SPFOptions, {"aging": 1}, "scheduler.options")


def test_hook_registers_scheduler_with_options() -> None:
    calls: list[tuple[Any, ...]] = []
    spf.sagellm_register_schedulers(lambda name, factory, options=None: calls.append((name, factory, options)))
    assert calls == [("spf", spf.SPFScheduler, spf.SPFOptions)]


def test_loads_through_the_plugin_manager() -> None:
    manager = create_plugin_manager(entry_points=False, extra={"spf": spf})
    assert manager.records["spf"].status == "loaded"
    assert manager.records["spf"].hooks == ["sagellm_register_schedulers"]
    registration = manager.registry.get("scheduler", "spf")
    assert registration.plugin == "spf" and registration.options is spf.SPFOptions
    scheduler = registration.factory(SchedulerConfig(), spf.SPFOptions(1.0))
    assert isinstance(scheduler, spf.SPFScheduler)
