"""Scheduler contract: the request lifecycle (base class) and the budgeted, preempting policy
scheduler most plugins subclass.

The lifecycle is the base class's job and the same for every scheduler (as nano-vllm's
``postprocess`` and vLLM's ``update_from_output``): `plan_step` turns the policy's decision into a
plain `StepPlan` and advances ``num_computed_tokens`` (its only writer besides admission and
preemption below); `update_from_output` puts sampled tokens in place, decides EOS / stop-id /
length finishes and frees their KV; `finish` ends a request for any other reason. A plugin
overrides policy only: `PolicyScheduler.waiting_key`, `preemption_victim`, `can_admit`.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import attrs

from sagellm_core.config import FALLBACK_MAX_NUM_BATCHED_TOKENS, FALLBACK_MAX_NUM_SEQS, SchedulerConfig
from sagellm_core.kv.manager import KVCacheManager, PrefixHit
from sagellm_core.plan import BlockTransfer, ChunkPlan, StepPlan
from sagellm_core.request import Request, RequestStatus

__all__ = ["BlockTransfer", "PolicyScheduler", "ScheduledChunk", "Scheduler", "SchedulerOutput", "TokenUpdate"]


@attrs.define
class ScheduledChunk:
    """Run ``num_tokens`` more tokens of ``request`` this step."""

    request: Request
    num_tokens: int


@attrs.define
class SchedulerOutput:
    """A policy's decision for one step: chunks (decodes first), the pool they run on, requests it
    preempted, and block copies (strict PD)."""

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


@attrs.define
class TokenUpdate:
    """A sampled token that reached its request. ``visible``: part of the text (not the EOS or
    stop id that ended generation); ``may_stop``: ``min_tokens`` reached with this token."""

    request: Request
    token_id: int
    visible: bool
    may_stop: bool


class Scheduler:
    """Base class: owns the waiting and running queues, the KV pools it allocates from, and every
    request's lifecycle. Subclasses implement ``schedule``."""

    def __init__(self, config: SchedulerConfig, options: Any = None) -> None:
        self.config = config
        self.options = options
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.kv: list[KVCacheManager] = []
        self.num_preemptions = 0
        self.num_self_preemptions = 0
        self.prefix_counted: set[str] = set()  # loaded prefixes counted before their admission

    @property
    def max_num_seqs(self) -> int:
        """``config.max_num_seqs`` (the engine resolves it from the device when unset)."""
        return self.config.max_num_seqs or FALLBACK_MAX_NUM_SEQS

    @property
    def max_num_batched_tokens(self) -> int:
        """``config.max_num_batched_tokens`` (the engine resolves it from the device when unset)."""
        return self.config.max_num_batched_tokens or FALLBACK_MAX_NUM_BATCHED_TOKENS

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
        self.requests[request.request_id] = request

    def finish(self, request: Request, status: RequestStatus | None = None,
               stop_reason: str | int | None = None) -> None:
        """End ``request`` (with ``status``, if given): drop its placeholders, remove it from the
        queues, release its KV blocks. Idempotent."""
        if status is not None:
            request.status = status
            request.stop_reason = stop_reason
        request.drop_pending_tokens()
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
        self.prefix_counted.discard(request.request_id)
        for pool in self.kv:
            pool.free(request.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:  # pragma: no cover - abstract
        """The policy: which requests run how many tokens this step (reads, never advances, the
        requests' computed tokens)."""
        raise NotImplementedError

    # ---- lifecycle -----------------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        """Schedule one step and commit it: the plain plan for the runner; computed tokens advance
        and each sampling request holds a placeholder for the token the step will sample."""
        output = self.schedule()
        for pool in self.kv:
            pool.end_planning()  # evicted blocks are copied down before this step can overwrite them
        plan = StepPlan(pool=output.pool, transfers=list(output.transfers),
                        preempted=[r.request_id for r in output.preempted])
        for chunk in output.chunks:
            request = chunk.request
            start = request.num_computed_tokens
            end = start + chunk.num_tokens
            sample = end == request.num_tokens
            plan.chunks.append(ChunkPlan(
                request.request_id, start, request.token_slice(start, end),
                self.kv[request.pool].block_ids(request.request_id), sample,
                decode=chunk.num_tokens == 1 and start >= request.num_prompt_tokens))
            request.num_computed_tokens = end
            if sample:
                request.add_pending_token()
        return plan

    def on_launched(self, plan: StepPlan) -> None:
        """The step is queued on the device: make its completed full blocks findable by later
        requests (those holding only known tokens; the rest follow in `update_from_output`)."""
        self._cache_blocks(c.request_id for c in plan.chunks)

    def update_from_output(self, plan: StepPlan, token_ids: Sequence[int],
                           request_ids: Sequence[str] | None = None) -> list[TokenUpdate]:
        """Put the step's sampled tokens in place of their placeholders (one per ``request_ids``,
        by default the ``plan.sampled`` chunks' requests) and finish requests on EOS, a stop id or
        their length. A token of a request that ended meanwhile is dropped."""
        updates = []
        if request_ids is None:
            request_ids = [c.request_id for c in plan.sampled]
        for request_id, token_id in zip(request_ids, token_ids):
            request = self.awaiting_token(request_id)
            if request is None:
                continue  # ended while the step ran
            count = request.resolve_pending_token(token_id)
            params = request.params
            may_stop = count >= params.min_tokens
            visible = True
            if may_stop and not params.ignore_eos and token_id in request.eos_token_ids:
                self.finish(request, RequestStatus.FINISHED_STOPPED)
                visible = False
            elif may_stop and token_id in params.stop_token_ids:
                self.finish(request, RequestStatus.FINISHED_STOPPED, token_id)
                visible = False
            elif count >= request.max_tokens:
                self.finish(request, RequestStatus.FINISHED_LENGTH)
            updates.append(TokenUpdate(request, token_id, visible, may_stop))
        self._cache_blocks(c.request_id for c in plan.chunks)
        return updates

    def awaiting_token(self, request_id: str) -> Request | None:
        """The request whose step in flight will accept its sampled token (`update_from_output`), or
        None when it ended while the step ran (its token is dropped)."""
        request = self.requests.get(request_id)
        return request if request is not None and request.num_placeholders > 0 else None

    def _cache_blocks(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if (request is not None and request.status is RequestStatus.RUNNING
                    and request.num_computed_tokens <= request.num_tokens - request.num_placeholders):
                self.kv[request.pool].cache_full_blocks(request)

    def after_step(self, output: SchedulerOutput) -> None:
        """For drivers that advance requests themselves (simulations): cache completed blocks."""
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

    def stats(self) -> dict[str, int]:
        """Counters for `LLMEngine.get_stats` (subclasses extend)."""
        return {"preemptions": self.num_preemptions, "self_preemptions": self.num_self_preemptions}


class PolicyScheduler(Scheduler):
    """Continuous batching under token and sequence budgets, with chunked prefill and preemption.

    Each step: running requests first (decodes and unfinished prefill chunks) in ``waiting_key``
    order, preempting ``preemption_victim`` when KV runs out; then waiting requests in
    ``waiting_key`` order while budget, sequence slots and KV blocks last. Override the keys to get
    FCFS, priority, shortest-prompt-first, ...

    No livelock: every admitted request fits its pool alone (the engine refuses the rest), and the
    first running request in order never preempts itself while another can give way, so it always
    progresses. A waiting request that ``can_admit`` refuses is skipped, not waited for.
    """

    def waiting_key(self, request: Request) -> Any:
        """Sort key of waiting requests; smallest is admitted first. Default: arrival order."""
        return request.arrival_order

    def preemption_victim(self, candidates: list[Request]) -> Request:
        """Which running request gives up its KV when memory runs out. Default: the latest arrival."""
        return max(candidates, key=lambda r: (self.waiting_key(r), r.arrival_order))

    def can_admit(self, request: Request) -> bool:
        """Whether a waiting request may start now (default: always). A refused one is skipped
        this step; the requests behind it are still considered."""
        return True

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(output, budget, self.running_order())
        if not output.preempted:
            self._schedule_waiting(output, budget, pool=0)
        for pool in self.kv:
            pool.flush()
        output.chunks.sort(key=lambda c: c.num_tokens > 1)  # decodes (one query token) first
        return output

    def running_order(self) -> list[Request]:
        return sorted(self.running, key=lambda r: (self.waiting_key(r), r.arrival_order))

    def _schedule_running(self, output: SchedulerOutput, budget: int, order: Iterable[Request]) -> int:
        scheduled: set[int] = set()
        for request in list(order):
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING or request.reached_length:
                continue  # preempted earlier in this loop, or its last token is already planned
            num_tokens = min(request.num_pending_tokens, budget)
            pool = self.kv[request.pool]
            while not pool.allocate(request, num_tokens):
                candidates = [r for r in self.running if id(r) not in scheduled and r.pool == request.pool]
                if not scheduled and len(candidates) > 1:
                    candidates.remove(request)  # the head never gives way while another can
                victim = self.preemption_victim(candidates)
                self.preempt(victim, output)
                if victim is request:
                    self.num_self_preemptions += 1
                    break
            if request.status is not RequestStatus.RUNNING:
                continue
            output.chunks.append(ScheduledChunk(request, num_tokens))
            scheduled.add(id(request))
            budget -= num_tokens
        return budget

    def _schedule_waiting(self, output: SchedulerOutput, budget: int, pool: int, waited: bool = False) -> int:
        """Admit waiting requests in ``waiting_key`` order while budget, sequence slots and KV blocks
        last. A request whose prefix continues below the device pool starts loading those blocks;
        once their copies are queued it runs in this step (the device orders the step after them),
        until then it waits (skipped, holding its blocks) and the requests behind it go on.
        Once a request finds no KV room, only requests that hold blocks already (loads) may still
        start."""
        self.waiting.sort(key=lambda r: (self.waiting_key(r), r.arrival_order))
        kv = self.kv[pool]
        skipped: list[Request] = []
        blocked = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if (request.reached_length or not self.can_admit(request)
                    or (blocked and not kv.block_ids(request.request_id))):
                skipped.append(self.waiting.pop(0))
                continue
            if kv.is_loading(request.request_id):
                loaded = kv.finish_load(request.request_id, order=True)
                if loaded is None:
                    skipped.append(self.waiting.pop(0))  # its blocks are still on their way
                    continue
                self._take_prefix(kv, request, loaded)
                self.prefix_counted.add(request.request_id)
                prefix = PrefixHit()
            elif request.num_computed_tokens == 0 and not kv.block_ids(request.request_id):
                prefix = kv.find_prefix(request)
            else:
                prefix = PrefixHit()
            pending = request.num_tokens - request.num_computed_tokens - prefix.num_blocks * kv.block_size
            if not self.config.chunked_prefill and budget < pending <= self.max_num_batched_tokens:
                break  # whole prompt fits a later step; wait for it rather than chunking
            num_tokens = min(pending, budget)
            if not kv.allocate(request, num_tokens, prefix):
                room = kv.owned_room(request) if prefix.num_blocks == 0 else 0
                if room <= 0 or not kv.allocate(request, min(num_tokens, room)):
                    if not any(kv.block_ids(r.request_id) for r in self.waiting[1:]):
                        break  # it fits once running requests finish (admission checked it fits alone)
                    blocked = True  # waiting requests behind hold (loaded) blocks: let them run
                    skipped.append(self.waiting.pop(0))
                    continue
                num_tokens = min(num_tokens, room)  # a loaded request runs in the blocks it holds
            if kv.is_loading(request.request_id):  # started just now: host blocks run in this step
                loaded = kv.finish_load(request.request_id, order=True)
                if loaded is None:
                    skipped.append(self.waiting.pop(0))
                    continue
                prefix = loaded
            if request.request_id in self.prefix_counted:
                self.prefix_counted.discard(request.request_id)  # counted when its load arrived
            else:
                self._take_prefix(kv, request, prefix)
            request.status = RequestStatus.RUNNING
            request.pool = pool
            self.waiting.pop(0)
            self.running.append(request)
            output.chunks.append(ScheduledChunk(request, num_tokens))
            output.pool = pool
            budget -= num_tokens
        self.waiting[:0] = skipped
        if not waited and not output.chunks and not self.running and self._wait_for_a_load(kv):
            return self._schedule_waiting(output, budget, pool, waited=True)  # admit what arrived
        return budget

    def _wait_for_a_load(self, kv: KVCacheManager) -> bool:
        """Nothing can run this step but a waiting request's load is in flight: wait for it (no work
        is held up) rather than spin through empty steps. False when there is none."""
        for request in self.waiting:
            if kv.is_loading(request.request_id):
                kv.wait_load(request.request_id)
                return True
        return False

    @staticmethod
    def _take_prefix(kv: KVCacheManager, request: Request, prefix: PrefixHit) -> None:
        """Count the request's prefix lookup (first admission only) and let its hit, device blocks
        and blocks loaded from below, count as computed."""
        hit_tokens = prefix.num_blocks * kv.block_size
        if request.num_preemptions == 0:
            kv.record_prefix_lookup(request.num_prompt_tokens, hit_tokens, prefix)
        request.num_cached_tokens = max(request.num_cached_tokens, hit_tokens)
        request.num_computed_tokens += hit_tokens
