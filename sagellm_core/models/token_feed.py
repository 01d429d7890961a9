"""Feeding a step the tokens its predecessor sampled, straight from device memory.

With async scheduling the engine launches step N+1 before it reads step N's sampled tokens; the
plan holds `PENDING_TOKEN` for them. Each such token is the last input of its chunk, so the runner
builds the inputs with the placeholders and then overwrites those rows from step N's token tensor
on the device, in stream order.
"""

from __future__ import annotations

import attrs
import torch


@attrs.define
class TokenFeed:
    """Step N's sampled tokens (device, one row per sampled sequence) and each request's row."""

    tokens: torch.Tensor
    rows: dict[str, int]


def feed_pending(input_ids: torch.Tensor, pending_rows: list[int], request_ids: list[str],
                 feed: TokenFeed | None) -> None:
    """Overwrite rows ``pending_rows`` of the device ``input_ids`` (placeholders of ``request_ids``)
    with those requests' tokens from ``feed``. Raises if one is not in the feed: a placeholder would
    reach the embedding as index -1."""
    if not pending_rows:
        return
    sources = [feed.rows.get(r) for r in request_ids] if feed is not None else [None]
    if any(row is None for row in sources):
        raise RuntimeError("a step's inputs hold a pending token that no in-flight step provides")
    count = len(pending_rows)
    if pending_rows == sources == list(range(count)):  # an unchanged decode batch: one device copy
        input_ids[:count].copy_(feed.tokens[:count])  # type: ignore[union-attr]
        return
    device = input_ids.device
    target = torch.tensor(pending_rows, dtype=torch.int64).to(device, non_blocking=True)
    source = torch.tensor(sources, dtype=torch.int64).to(device, non_blocking=True)
    input_ids.index_copy_(0, target, feed.tokens.index_select(0, source))  # type: ignore[union-attr]
