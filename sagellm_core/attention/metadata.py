"""Per-step description of the flattened token batch that the paged-attention op reads."""

from __future__ import annotations

from typing import Any

import attrs
import torch


@attrs.define
class AttentionMetadata:
    """Sequences are ordered decodes first (one query token each), then prefills / prefill chunks.

    ``slot_mapping[t]`` is where token t's K/V is written (``block_id * block_size + offset``);
    ``query_start_loc`` [B+1] are cumulative query lengths; ``seq_lens`` [B] are context lengths
    *including* this step's tokens; ``block_tables`` [B, max_blocks] (padded with 0). Host copies of
    the lengths let backends plan without a device sync. ``extras`` caches backend-specific derived
    tensors for the step (computed once, reused by every layer). ``generation`` is bumped whenever the
    tensors are refilled in place for another step (graph replays), so caches keyed on it stay valid.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_lens_host: list[int]
    seq_lens_host: list[int]
    num_decodes: int
    block_size: int
    extras: dict[Any, Any] = attrs.field(factory=dict)
    generation: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    def context_slots(self, seq_index: int) -> torch.Tensor:
        """Cache slots of positions 0..seq_len-1 of one sequence (derived from its block table)."""
        length = self.seq_lens_host[seq_index]
        positions = torch.arange(length, device=self.block_tables.device)
        blocks = self.block_tables[seq_index, positions // self.block_size].long()
        return blocks * self.block_size + positions % self.block_size
