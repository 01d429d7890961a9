"""Feeding a step the tokens its predecessor sampled, straight from device memory.

With async scheduling the engine launches step N+1 before it reads step N's sampled tokens; the
host only has placeholders (`PENDING_TOKEN`) for them. Each sequence's newest token is the last
input of its chunk, so the runner builds the inputs with the placeholders and then overwrites
those rows from step N's token tensor on the device, in stream order.
"""

from __future__ import annotations

from typing import Iterable

import attrs
import torch

from sagellm_core.request import PENDING_TOKEN
from sagellm_core.schedulers.base import ScheduledChunk


@attrs.define
class TokenFeed:
    """Step N's sampled tokens (device, one row per sampled sequence) and each sequence's row."""

    tokens: torch.Tensor
    rows: dict[str, int]

    def sources(self, chunks: Iterable[ScheduledChunk], last_inputs: Iterable[int]) -> tuple[list[int], list[int]]:
        """(input rows to overwrite, token rows to take) for chunks whose last input is pending."""
        targets: list[int] = []
        sources: list[int] = []
        for chunk, last in zip(chunks, last_inputs):
            request = chunk.request
            row = self.rows.get(request.request_id)
            if (row is not None and request.has_pending_token
                    and request.num_computed_tokens + chunk.num_tokens == request.num_tokens):
                targets.append(last)
                sources.append(row)
        return targets, sources


def feed_pending(input_ids: torch.Tensor, host_ids: list[int], chunks: list[ScheduledChunk],
                 last_inputs: list[int], feed: TokenFeed | None) -> None:
    """Overwrite the pending rows of the flat device ``input_ids`` (built from ``host_ids``) from
    ``feed``. Raises if a placeholder would stay: it would reach the embedding as index -1."""
    targets, sources = feed.sources(chunks, last_inputs) if feed is not None else ([], [])
    if host_ids.count(PENDING_TOKEN) != len(targets):
        raise RuntimeError("a step's inputs hold a pending token that no in-flight step provides")
    if not targets:
        return
    if targets == sources == list(range(len(targets))):  # an unchanged decode batch: one device copy
        input_ids[: len(targets)].copy_(feed.tokens[: len(targets)])
        return
    device = input_ids.device
    target_rows = torch.tensor(targets, dtype=torch.int64).to(device, non_blocking=True)
    source_rows = torch.tensor(sources, dtype=torch.int64).to(device, non_blocking=True)
    input_ids.index_copy_(0, target_rows, feed.tokens.index_select(0, source_rows))
