"""Decode steps replayed from captured device graphs (one graph per batch-size bucket and KV pool).

A decode-only step of B sequences is padded to the smallest bucket >= B; padding rows write no KV
(slot -1) and attend to nothing (context length 0). Inputs live in static device buffers updated
in place before each replay; the attention op reads lengths and block tables from them, so one
graph serves any context lengths up to the table width. The backend supplies the capture mechanism
(`Backend.graph_capture`); backends without one never reach this module. Everything a capture
needs (the forward function, the KV pools, the device) is passed in.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Protocol

import torch

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.models.inputs import build_host_batch, stage
from sagellm_core.models.token_feed import TokenFeed, feed_pending
from sagellm_core.plan import StepPlan

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, torch.Tensor], torch.Tensor]
"""(token ids [T], positions [T], metadata, KV pool tensor, rows to keep) -> float32 logits."""


class GraphCapture(Protocol):
    """Backend-provided: record ``fn``'s device work once; the returned callable replays it and
    returns the same output tensors (updated in place)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]: ...


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphRunner:
    """Static input buffers and the captured decode graphs of one model."""

    def __init__(self, forward: Forward, kv_pools: Callable[[int], torch.Tensor], capture: GraphCapture,
                 device: torch.device, block_size: int, max_batch: int, max_blocks_per_seq: int) -> None:
        self.forward = forward
        self.kv_pools = kv_pools
        self.capturer = capture
        self.device = device
        self.block_size = block_size
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

    def capture_all(self, pools: Iterable[int], progress: bool = True) -> float:
        """Capture every bucket of every pool now (largest first, as vLLM: smaller graphs reuse the
        larger ones' memory); returns the seconds it took. Without it graphs are captured lazily,
        inside the first steps of each size."""
        from tqdm import tqdm

        start = time.perf_counter()
        todo = [(pool, bucket) for pool in pools for bucket in reversed(self.buckets)
                if (pool, bucket) not in self.graphs]
        for pool, bucket in tqdm(todo, desc="Capturing decode graphs", unit="graph", disable=not progress,
                                 leave=False):
            self.graphs[(pool, bucket)] = self._capture(pool, bucket)
        return time.perf_counter() - start

    def supports(self, plan: StepPlan) -> bool:
        """Decode-only steps in which every sequence samples (no one-token prefill chunks)."""
        return (0 < len(plan.chunks) <= self.max_batch
                and all(c.num_tokens == 1 and c.sample for c in plan.chunks)
                and max(len(c.block_ids) for c in plan.chunks) <= self.max_blocks)

    def run(self, plan: StepPlan, feed: TokenFeed | None = None) -> torch.Tensor:
        batch = len(plan.chunks)
        bucket = next(b for b in self.buckets if b >= batch)
        entry = self.graphs.get((plan.pool, bucket))
        if entry is None:
            entry = self.graphs[(plan.pool, bucket)] = self._capture(plan.pool, bucket)
        self._fill(plan, bucket, feed)
        replay, meta = entry
        meta.generation += 1
        self.num_replays += 1
        return replay()[:batch]

    def _fill(self, plan: StepPlan, bucket: int, feed: TokenFeed | None) -> None:
        host = build_host_batch(plan, self.block_size, pad_to=bucket)
        # NOTE: only the first `width` table columns are refreshed: the kernel never reads a block
        # beyond a sequence's own length, and padding rows (length 0) read none.
        width = host.block_tables.shape[1]
        ids, positions, slots = stage([host.token_ids, host.positions, host.slots], torch.int64, self.device)
        seq_lens, tables = stage([host.seq_lens, host.block_tables], torch.int32, self.device)
        self.ids[:bucket].copy_(ids, non_blocking=True)
        feed_pending(self.ids, host.pending_rows, host.pending_requests, feed)
        self.positions[:bucket].copy_(positions, non_blocking=True)
        self.slots[:bucket].copy_(slots, non_blocking=True)
        self.seq_lens[:bucket].copy_(seq_lens, non_blocking=True)
        self.tables[:bucket, :width].copy_(tables, non_blocking=True)

    def _reset(self, bucket: int) -> None:
        self.slots[:bucket].fill_(-1)
        self.seq_lens[:bucket].zero_()
        self.ids[:bucket].zero_()
        self.positions[:bucket].zero_()

    def _capture(self, pool: int, bucket: int) -> tuple[Callable[[], torch.Tensor], AttentionMetadata]:
        bound = self.max_blocks * self.block_size
        meta = AttentionMetadata(
            slot_mapping=self.slots[:bucket], query_start_loc=self.query_start[: bucket + 1],
            seq_lens=self.seq_lens[:bucket], block_tables=self.tables[:bucket],
            query_lens_host=[1] * bucket, seq_lens_host=[bound] * bucket, num_decodes=bucket,
            block_size=self.block_size,
        )
        kv = self.kv_pools(pool)

        def forward() -> torch.Tensor:
            return self.forward(self.ids[:bucket], self.positions[:bucket], meta, kv, self.keep[:bucket])

        self._reset(bucket)
        forward()  # warm-up: compiles kernels and allocates per-step scratch outside the graph
        self._reset(bucket)
        return self.capturer.capture(forward), meta
