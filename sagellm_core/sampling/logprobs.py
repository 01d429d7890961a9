"""Logprobs on the device: the chosen token's and the top-n alternatives of each row that asked,
copied to the host together with the sampled tokens (no synchronous step).

The log-sum-exp and the top-n come from the backend's one-pass op where it has one
(`sagellm_core.backend.Backend.fused_logprobs`, passed to `logprob_tensors`), else from torch
(``logsumexp`` and ``topk``)."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from sagellm_core.request import Request

Logprobs = tuple[float, list[int], list[float]]
"""(the chosen token's logprob, the top alternatives' token ids (best first), their logprobs)."""

HostCopy = Callable[[torch.Tensor], Callable[[], list[Any]]]

LogprobParts = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(log-sum-exp [M, 1] float32, top-n logprobs [M, n] best first, their token ids [M, n] int64)."""

FusedLogprobs = Callable[[torch.Tensor, int], "LogprobParts | None"]
"""A backend's one-pass op: (logits [M, V] float32, n) -> `LogprobParts`, or None where it does not
apply (the torch path then runs). See `sagellm_core.backend.Backend.fused_logprobs`."""


@attrs.define
class LogprobTensors:
    """Device results for the rows in ``rows`` (batch rows that asked, in order)."""

    rows: list[int]
    counts: list[int]  # alternatives each row asked for
    logits: torch.Tensor  # [M, V] the processed logits of those rows
    normalizer: torch.Tensor  # [M, 1] their logsumexp
    top_values: torch.Tensor  # [M, max count] logprobs
    top_ids: torch.Tensor  # [M, max count]
    chosen: torch.Tensor | None = None  # [M] logprob of the sampled token, after `choose`

    def choose(self, token_ids: torch.Tensor) -> None:
        """Gather the sampled tokens' logprobs (``token_ids`` [N] on the device)."""
        tokens = token_ids
        if len(self.rows) != token_ids.shape[0]:
            index = torch.tensor(self.rows, dtype=torch.int64).to(token_ids.device, non_blocking=True)
            tokens = token_ids.index_select(0, index)
        self.chosen = (self.logits.gather(1, tokens.unsqueeze(1)) - self.normalizer).squeeze(1)
        self.logits = self.logits[:0]  # only the small tensors are kept alive

    def start_copy(self, copy: HostCopy) -> Callable[[], dict[int, Logprobs]]:
        """Start the host copies (``copy``: the backend's `start_host_copy`); the returned function
        waits for them and gives each asking row's logprobs."""
        assert self.chosen is not None, "choose() runs before the copy"
        values = copy(torch.cat([self.chosen.unsqueeze(1), self.top_values], dim=1))
        ids = copy(self.top_ids)

        def read() -> dict[int, Logprobs]:
            host_values, host_ids = values(), ids()
            out: dict[int, Logprobs] = {}
            for i, (row, count) in enumerate(zip(self.rows, self.counts)):
                row_values = host_values[i]
                out[row] = (row_values[0], host_ids[i][:count], row_values[1: count + 1])
            return out

        return read


def logprob_tensors(logits: torch.Tensor, requests: list[Request],
                    fused: FusedLogprobs | None = None) -> LogprobTensors | None:
    """Queue log-softmax and top-n for the rows whose request asked for logprobs (None if none),
    through ``fused`` (a backend's one-pass op) where it applies, else torch."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    counts = [int(requests[i].params.logprobs or 0) for i in rows]
    if len(rows) != len(requests):
        logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True))
    width = max(counts)
    parts = fused(logits, width) if fused is not None else None
    if parts is None:
        parts = torch_logprobs(logits, width)
    normalizer, top_values, top_ids = parts
    return LogprobTensors(rows, counts, logits, normalizer, top_values, top_ids)


def torch_logprobs(logits: torch.Tensor, width: int) -> LogprobParts:
    """The generic path: ``logsumexp`` and ``topk`` of ``logits`` [M, V] (``width`` alternatives)."""
    # log-softmax without writing it: logsumexp and top-k read the logits once each
    normalizer = logits.logsumexp(dim=-1, keepdim=True)
    if width:
        top_values, top_ids = logits.topk(width, dim=-1)
        top_values = top_values - normalizer
    else:
        top_values = logits.new_empty((logits.shape[0], 0))
        top_ids = torch.empty((logits.shape[0], 0), dtype=torch.int64, device=logits.device)
    return normalizer, top_values, top_ids


def read_logprobs(info: LogprobTensors | None, copy: HostCopy, num_rows: int) -> Callable[[], list[Logprobs | None]]:
    """Start the copies of ``info`` (if any); the function gives one entry per batch row."""
    if info is None:
        return lambda: [None] * num_rows
    read = info.start_copy(copy)

    def rows() -> list[Logprobs | None]:
        found = read()
        return [found.get(row) for row in range(num_rows)]

    return rows
