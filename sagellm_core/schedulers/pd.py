"""Prefill/decode (PD) scheduler with the modes ``strict``, ``time_share`` and ``hybrid``.

- ``hybrid``: every step carries all running decodes plus prefill chunks up to the token budget
  (Sarathi-style chunked prefill) -- the `PolicyScheduler` behaviour.
- ``time_share``: one KV pool; a step is either all decodes or all prefill. Decodes go first, but
  after ``max_decode_steps`` consecutive decode steps a waiting prefill gets a step (bounded starvation).
- ``strict``: like ``time_share`` but with two KV pools: prefill runs on pool 0, and once a request's
  prompt is done its blocks are copied into pool 1 where it decodes (disaggregation on one host).
"""

from __future__ import annotations

from typing import Any

import attrs

from sagellm_core.config import at_least, in_range, one_of
from sagellm_core.plan import BlockTransfer
from sagellm_core.request import Request
from sagellm_core.schedulers.base import PolicyScheduler, SchedulerOutput

PREFILL_POOL, DECODE_POOL = 0, 1


@attrs.frozen
class PDOptions:
    mode: str = attrs.field(default="hybrid", validator=one_of("strict", "time_share", "hybrid"))
    max_decode_steps: int = attrs.field(default=8, validator=at_least(1))
    decode_pool_fraction: float = attrs.field(default=0.5, validator=in_range(0.05, 0.95))


class PDScheduler(PolicyScheduler):
    """See the module docstring."""

    def __init__(self, config: Any, options: PDOptions | None = None) -> None:
        super().__init__(config, options or PDOptions())
        self.mode = self.options.mode
        self.decode_streak = 0
        self.num_prefill_steps = 0
        self.num_decode_steps = 0
        self.num_mixed_steps = 0
        self.num_transferred_blocks = 0

    @property
    def num_kv_pools(self) -> int:
        return 2 if self.mode == "strict" else 1

    def kv_pool_fractions(self) -> list[float]:
        if self.mode != "strict":
            return super().kv_pool_fractions()
        return [1.0 - self.options.decode_pool_fraction, self.options.decode_pool_fraction]

    def schedule(self) -> SchedulerOutput:
        if self.mode == "hybrid":
            output = super().schedule()
            self._count(output)
            return output
        output = SchedulerOutput()
        if self.mode == "strict":
            output.transfers = self._transfers()
        decodes = [r for r in self.running if not r.in_prefill and r.pool == self._decode_pool]
        prefills = [r for r in self.running if r.in_prefill]
        want_prefill = bool(self.waiting or prefills)
        if want_prefill and (not decodes or self.decode_streak >= self.options.max_decode_steps):
            self.decode_streak = 0
            budget = self._schedule_running(output, self.max_num_batched_tokens, self._ordered(prefills))
            if not output.preempted:
                self._schedule_waiting(output, budget, pool=PREFILL_POOL)
            output.pool = PREFILL_POOL
        elif decodes:
            self.decode_streak += 1
            self._schedule_running(output, self.max_num_batched_tokens, self._ordered(decodes))
            output.pool = self._decode_pool
        self._count(output)
        return output

    @property
    def _decode_pool(self) -> int:
        return DECODE_POOL if self.mode == "strict" else PREFILL_POOL

    def _ordered(self, requests: list[Request]) -> list[Request]:
        return sorted(requests, key=lambda r: (self.waiting_key(r), r.arrival_order))

    def _transfers(self) -> list[BlockTransfer]:
        """Move every request whose prompt is done from the prefill pool to the decode pool, if it fits."""
        transfers = []
        src, dst = self.kv[PREFILL_POOL], self.kv[DECODE_POOL]
        for request in self._ordered([r for r in self.running if r.pool == PREFILL_POOL and not r.in_prefill]):
            src_blocks = src.block_ids(request.request_id)
            if not dst.allocate_tokens(request.request_id, request.num_computed_tokens):
                break  # decode pool full: it stays in the prefill pool until decodes finish
            transfers.append(BlockTransfer(request.request_id, PREFILL_POOL, DECODE_POOL, src_blocks,
                                           dst.block_ids(request.request_id)))
            src.free(request.request_id)
            request.pool = DECODE_POOL
            self.num_transferred_blocks += len(src_blocks)
        return transfers

    def _count(self, output: SchedulerOutput) -> None:
        has_decode = any(c.num_tokens == 1 and not c.request.in_prefill for c in output.chunks)
        has_prefill = any(c.request.in_prefill for c in output.chunks)
        if has_decode and has_prefill:
            self.num_mixed_steps += 1
        elif has_prefill:
            self.num_prefill_steps += 1
        elif has_decode:
            self.num_decode_steps += 1

    def stats(self) -> dict[str, int]:
        return {
            **super().stats(),
            "prefill_steps": self.num_prefill_steps,
            "decode_steps": self.num_decode_steps,
            "mixed_steps": self.num_mixed_steps,
            "transferred_blocks": self.num_transferred_blocks,
        }


