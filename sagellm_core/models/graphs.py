"""Decode steps replayed from captured device graphs (one graph per batch-size bucket and KV pool).

A decode-only step of B sequences is padded to the smallest bucket >= B; padding rows write no KV
(slot -1) and attend to nothing (context length 0). Inputs live in static device buffers updated
in place before each replay; the attention op reads lengths and block tables from them, so one
graph serves any context lengths up to the table width. The backend supplies the capture mechanism
(`Backend.graph_capture`); backends without one never reach this module.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.attention import hook as attention_hook
from sagellm_core.models.token_feed import TokenFeed, feed_pending
from sagellm_core.schedulers.base import SchedulerOutput


class GraphCapture(Protocol):
    """Backend-provided: record ``fn``'s device work once; the returned callable replays it and
    returns the same output tensors (updated in place)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]: ...


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphRunner:
    """Owns the static input buffers and the captured graphs of one `ModelRunner`."""

    def __init__(self, runner: Any, capture: GraphCapture, max_batch: int, max_blocks_per_seq: int) -> None:
        device = runner.device
        self.runner = runner
        self.capturer = capture
        self.buckets = bucket_sizes(max_batch)
        self.max_batch = max_batch
        self.max_blocks = max_blocks_per_seq
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.query_start = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.keep = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], tuple[Callable[[], torch.Tensor], AttentionMetadata]] = {}
        self.num_replays = 0

    def supports(self, plan: SchedulerOutput, block_ids: list[list[int]]) -> bool:
        """Decode-only steps in which every sequence samples (no one-token prefill chunks)."""
        return (0 < len(plan.chunks) <= self.max_batch
                and all(c.num_tokens == 1 and c.request.num_computed_tokens + 1 == c.request.num_tokens
                        for c in plan.chunks)
                and max(len(b) for b in block_ids) <= self.max_blocks)

    def run(self, plan: SchedulerOutput, block_ids: list[list[int]], feed: TokenFeed | None = None) -> torch.Tensor:
        batch = len(plan.chunks)
        bucket = next(b for b in self.buckets if b >= batch)
        entry = self.graphs.get((plan.pool, bucket))
        if entry is None:
            entry = self.graphs[(plan.pool, bucket)] = self._capture(plan.pool, bucket)
        self._fill(plan, block_ids, bucket, feed)
        replay, meta = entry
        meta.generation += 1
        self.num_replays += 1
        return replay()[:batch]

    def _fill(self, plan: SchedulerOutput, block_ids: list[list[int]], bucket: int, feed: TokenFeed | None) -> None:
        bs = self.runner.block_size
        pad = bucket - len(plan.chunks)
        ids, positions, slots, lens = [], [], [], []
        for chunk, blocks in zip(plan.chunks, block_ids):
            pos = chunk.request.num_computed_tokens
            ids.append(chunk.request.token_slice(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
        # NOTE: only the first `width` columns are refreshed: the kernel never reads a block beyond a
        # sequence's own length, and padding rows (length 0) read none.
        width = max(len(b) for b in block_ids)
        tables = [b + [0] * (width - len(b)) for b in block_ids] + [[0] * width] * pad
        self.ids[:bucket].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        feed_pending(self.ids, ids, plan.chunks, list(range(len(ids))), feed)
        self.positions[:bucket].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:bucket].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.seq_lens[:bucket].copy_(torch.tensor(lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.tables[:bucket, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    def _reset(self, bucket: int) -> None:
        self.slots[:bucket].fill_(-1)
        self.seq_lens[:bucket].zero_()
        self.ids[:bucket].zero_()
        self.positions[:bucket].zero_()

    def _capture(self, pool: int, bucket: int) -> tuple[Callable[[], torch.Tensor], AttentionMetadata]:
        runner = self.runner
        bound = self.max_blocks * runner.block_size
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bucket], query_start_loc=self.query_start[: bucket + 1],
            seq_lens=self.seq_lens[:bucket], block_tables=self.tables[:bucket],
            query_lens_host=[1] * bucket, seq_lens_host=[bound] * bucket, num_decodes=bucket,
            block_size=runner.block_size,
        )
        step = attention_hook.StepContext(meta=meta, kv_cache=runner.kv_caches[pool], op=runner.op)

        def forward() -> torch.Tensor:
            out = runner.model(input_ids=self.ids[None, :bucket], position_ids=self.positions[None, :bucket],
                               use_cache=False, logits_to_keep=self.keep[:bucket], sagellm_step=step)
            return out.logits[0].float()

        self._reset(bucket)
        forward()  # warm-up: compiles kernels and allocates per-step scratch outside the graph
        self._reset(bucket)
        return self.capturer.capture(forward), meta
