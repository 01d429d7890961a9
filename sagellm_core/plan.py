"""The plan of one engine step as plain data (a leaf module: the model runner imports it without
importing the scheduler; a plan could cross a process boundary as it is).

A step runs, for each scheduled request, ``num_tokens`` tokens starting at position ``start`` with
the KV of positions ``[0, start + num_tokens)`` living in ``block_ids`` of pool ``pool``. A token
sampled by a step whose result the host has not read yet appears as `PENDING_TOKEN`; the runner
takes its value from that step's token tensor on the device (`sagellm_core.models.token_feed`).
"""

from __future__ import annotations

import attrs

PENDING_TOKEN = -1
"""Stands for a token sampled by a step still running on the device: counts are right, the value
arrives when the engine reads that step (async scheduling)."""


@attrs.define
class ChunkPlan:
    """Run ``token_ids`` (positions ``start .. start + num_tokens - 1``) of one request.

    ``sample``: the chunk ends at the request's newest token, so a token is sampled from its last
    row. ``decode``: the chunk's input is a generated token (not a prompt token).
    """

    request_id: str
    start: int
    token_ids: list[int]
    block_ids: list[int]
    sample: bool
    decode: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def feeds_pending(self) -> bool:
        """The last input is a token of a step still in flight."""
        return self.token_ids[-1] == PENDING_TOKEN


@attrs.define
class BlockTransfer:
    """Copy one request's KV blocks between pools (strict PD: prefill pool -> decode pool)."""

    request_id: str
    src_pool: int
    dst_pool: int
    src_blocks: list[int]
    dst_blocks: list[int]


@attrs.define
class StepPlan:
    """Everything the runner needs for one step: chunks (decodes first), their pool, block copies
    to do before the forward pass, and the ids of requests preempted while planning."""

    chunks: list[ChunkPlan] = attrs.field(factory=list)
    pool: int = 0
    transfers: list[BlockTransfer] = attrs.field(factory=list)
    preempted: list[str] = attrs.field(factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        """Query tokens of decode chunks (one each); the rest of `num_tokens` is prefill."""
        return sum(1 for c in self.chunks if c.decode)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.transfers

    @property
    def sampled(self) -> list[ChunkPlan]:
        """The chunks that sample a token, in the order of the sampled-token rows."""
        return [c for c in self.chunks if c.sample]
