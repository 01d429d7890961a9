"""Scheduler contract and the budgeted, preempting scheduler most plugins subclass."""

from __future__ import annotations

from typing import Any, Iterable

import attrs

from sagellm_core.config import SchedulerConfig
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.request import Request, RequestStatus


@attrs.define
class ScheduledChunk:
    """Run ``num_tokens`` more tokens of ``request`` this step."""

    request: Request
    num_tokens: int


@attrs.define
class BlockTransfer:
    """Copy a request's KV blocks between pools (strict PD: prefill pool -> decode pool)."""

    request: Request
    src_pool: int
    dst_pool: int
    src_blocks: list[int]
    dst_blocks: list[int]


@attrs.define
class SchedulerOutput:
    """The plan for one step: chunks (decodes first), the pool they run on, and bookkeeping events."""

    chunks: list[ScheduledChunk] = attrs.field(factory=list)
    pool: int = 0
    preempted: list[Request] = attrs.field(factory=list)
    transfers: list[BlockTransfer] = attrs.field(factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.transfers


class Scheduler:
    """Base class: owns the waiting and running queues and the KV pools it allocates from.

    The engine calls ``add``, ``schedule`` once per step, ``finish`` when a request ends (stop,
    length or abort). Subclasses implement ``schedule``.
    """

    def __init__(self, config: SchedulerConfig, options: Any = None) -> None:
        self.config = config
        self.options = options
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.kv: list[KVCacheManager] = []
        self.num_preemptions = 0

    # ---- wiring --------------------------------------------------------------------------------
    @property
    def num_kv_pools(self) -> int:
        """How many KV pools this scheduler wants (strict PD asks for two)."""
        return 1

    def kv_pool_fractions(self) -> list[float]:
        """How the KV memory is split between the pools (one fraction per pool)."""
        return [1.0 / self.num_kv_pools] * self.num_kv_pools

    def bind(self, kv_pools: list[KVCacheManager]) -> None:
        self.kv = kv_pools

    # ---- queue management ----------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request) -> None:
        """Remove a finished/aborted request from the queues and release its KV blocks."""
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        for pool in self.kv:
            pool.free(request.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, output: SchedulerOutput) -> None:
        """Called after the model ran ``output`` and the engine updated the requests."""
        for chunk in output.chunks:
            if not chunk.request.is_finished:
                self.kv[chunk.request.pool].cache_full_blocks(chunk.request)

    # ---- helpers for subclasses ----------------------------------------------------------------
    def preempt(self, request: Request, output: SchedulerOutput) -> None:
        """Recompute-style preemption: drop the KV, requeue the request with its tokens so far."""
        self.running.remove(request)
        for pool in self.kv:
            pool.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.pool = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)
        output.preempted.append(request)


class PolicyScheduler(Scheduler):
    """Continuous batching under token and sequence budgets, with chunked prefill and preemption.

    Each step: running requests first (decodes and unfinished prefill chunks) in ``running_key``
    order, preempting ``preemption_victim`` when KV runs out; then waiting requests in
    ``waiting_key`` order while budget, sequence slots and KV blocks last. Override the two keys to
    get FCFS, priority, shortest-prompt-first, ...
    """

    def waiting_key(self, request: Request) -> Any:
        """Sort key of waiting requests; smallest is admitted first. Default: arrival order."""
        return request.arrival_order

    def preemption_victim(self, candidates: list[Request]) -> Request:
        """Which running request gives up its KV when memory runs out. Default: the latest arrival."""
        return max(candidates, key=lambda r: (self.waiting_key(r), r.arrival_order))

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(output, budget, self.running_order())
        if not output.preempted:
            self._schedule_waiting(output, budget, pool=0)
        output.chunks.sort(key=lambda c: c.num_tokens > 1)  # decodes (one query token) first
        return output

    def running_order(self) -> list[Request]:
        return sorted(self.running, key=lambda r: (self.waiting_key(r), r.arrival_order))

    def _schedule_running(self, output: SchedulerOutput, budget: int, order: Iterable[Request]) -> int:
        scheduled: set[int] = set()
        for request in list(order):
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(request.num_pending_tokens, budget)
            pool = self.kv[request.pool]
            while not pool.allocate(request, num_tokens):
                candidates = [r for r in self.running if id(r) not in scheduled and r.pool == request.pool]
                victim = self.preemption_victim(candidates)
                self.preempt(victim, output)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            output.chunks.append(ScheduledChunk(request, num_tokens))
            scheduled.add(id(request))
            budget -= num_tokens
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int, pool: int) -> int:
        self.waiting.sort(key=lambda r: (self.waiting_key(r), r.arrival_order))
        kv = self.kv[pool]
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = kv.find_prefix(request) if request.num_computed_tokens == 0 else []
            num_computed = request.num_computed_tokens + len(prefix) * kv.block_size
            pending = request.num_tokens - num_computed
            if not self.config.chunked_prefill and budget < pending <= self.config.max_num_batched_tokens:
                break  # whole prompt fits a later step; wait for it rather than chunking
            num_tokens = min(pending, budget)
            if not kv.allocate(request, num_tokens, prefix):
                break
            if request.num_preemptions == 0:
                kv.record_prefix_lookup(request.num_prompt_tokens, len(prefix) * kv.block_size)
            request.num_cached_tokens = max(request.num_cached_tokens, len(prefix) * kv.block_size)
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            request.pool = pool
            self.waiting.pop(0)
            self.running.append(request)
            output.chunks.append(ScheduledChunk(request, num_tokens))
            output.pool = pool
            budget -= num_tokens
        return budget
