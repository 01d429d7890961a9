"""Repetition, presence and frequency penalties as batched device work over per-request token counts.

Counts live on the device in a slot table with one row per request that uses penalties (requests
without penalties cost nothing): ``counts[slot, token]`` holds how often ``token`` was generated and
``seen[slot, token]`` whether it is in the prompt or the output. A slot is filled from the host's
tokens when a request first samples, and afterwards only from the sampled token tensor on the
device, in stream order, so a step with penalties stays in the asynchronous pipeline (the host never reads tokens for
it). Memory: 5 bytes per vocabulary entry per penalized request in flight (760 KB for a
151,936-token vocabulary); the table grows by doubling up to the most penalized requests in flight
at once (a slot is freed when its request finishes).

Meanings (as vLLM and transformers): ``repetition_penalty`` r divides positive logits by r and
multiplies negative ones by r for every token in the prompt or the output so far;
``presence_penalty`` p and ``frequency_penalty`` f subtract ``p * (count > 0) + f * count`` with
counts of the output only (the prompt does not count, as in vLLM and OpenAI).
"""

from __future__ import annotations

import torch

from sagellm_core.request import Request


def _on(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class PenaltyState:
    """The device slot table of token counts and the penalty arithmetic over it."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.counts: torch.Tensor | None = None  # [capacity, vocab] int32
        self.seen: torch.Tensor | None = None  # [capacity, vocab] bool: in the prompt or the output

    @property
    def capacity(self) -> int:
        return 0 if self.counts is None else int(self.counts.shape[0])

    def forget(self, request_id: str) -> None:
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.free.append(slot)

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` [N, V] with every penalized row's penalties applied (a new tensor when any)."""
        rows = [i for i, r in enumerate(requests) if r.params.needs_penalties]
        if not rows:
            return logits
        device, vocab = logits.device, logits.shape[1]
        slots = _on([self._slot(requests[i], vocab, device) for i in rows], device)
        assert self.counts is not None and self.seen is not None
        params = [requests[i].params for i in rows]
        every_row = len(rows) == len(requests)
        index = None if every_row else _on(rows, device)
        x = logits if index is None else logits.index_select(0, index)
        if any(p.repetition_penalty != 1.0 for p in params):
            repetition = _on([p.repetition_penalty for p in params], device, x.dtype).unsqueeze(1)
            x = torch.where(self.seen.index_select(0, slots), torch.where(x > 0, x / repetition, x * repetition), x)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            counts = self.counts.index_select(0, slots).to(x.dtype)
            presence = _on([p.presence_penalty for p in params], device, x.dtype).unsqueeze(1)
            frequency = _on([p.frequency_penalty for p in params], device, x.dtype).unsqueeze(1)
            x = x - frequency * counts - presence * (counts > 0).to(x.dtype)
        return x if index is None else logits.index_copy(0, index, x)

    def record(self, requests: list[Request], token_ids: torch.Tensor) -> None:
        """Count each penalized request's sampled token (``token_ids`` [N] on the device)."""
        rows = [i for i, r in enumerate(requests) if r.request_id in self.slots]
        if not rows or self.counts is None:
            return
        device = token_ids.device
        slots = _on([self.slots[requests[i].request_id] for i in rows], device)
        tokens = token_ids.index_select(0, _on(rows, device))
        ones = torch.ones(len(rows), dtype=self.counts.dtype, device=device)
        self.counts.index_put_((slots, tokens), ones, accumulate=True)
        self.seen.index_put_((slots, tokens), torch.ones(len(rows), dtype=torch.bool, device=device))  # type: ignore[union-attr]

    def _slot(self, request: Request, vocab: int, device: torch.device) -> int:
        slot = self.slots.get(request.request_id)
        if slot is not None:
            return slot
        if not self.free:
            self._grow(vocab, device)
        slot = self.slots[request.request_id] = self.free.pop()
        self._fill(slot, request, vocab, device)
        return slot

    def _grow(self, vocab: int, device: torch.device) -> None:
        old = self.capacity
        new = max(4, 2 * old)
        counts = torch.zeros((new, vocab), dtype=torch.int32, device=device)
        seen = torch.zeros((new, vocab), dtype=torch.bool, device=device)
        if self.counts is not None and self.seen is not None:
            counts[:old].copy_(self.counts)
            seen[:old].copy_(self.seen)
        self.counts, self.seen = counts, seen
        self.free.extend(range(new - 1, old - 1, -1))

    def _fill(self, slot: int, request: Request, vocab: int, device: torch.device) -> None:
        """A new slot from the host's tokens: the prompt, and outputs already read (a request that
        resumes after preemption)."""
        assert self.counts is not None and self.seen is not None
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        outputs = [t for t in request.prior_output_ids if 0 <= t < vocab]
        seen = [t for t in request.prompt_token_ids if 0 <= t < vocab] + outputs
        if seen:
            self.seen[slot].index_fill_(0, _on(seen, device), True)
        if outputs:
            ones = torch.ones(len(outputs), dtype=torch.int32, device=device)
            self.counts[slot].index_put_((_on(outputs, device),), ones, accumulate=True)
