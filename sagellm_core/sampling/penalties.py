"""Repetition, presence and frequency penalties as batched device work over per-request token
histories kept on the device.

A slot table holds one row per request that uses penalties (requests without penalties cost
nothing): ``tokens[slot, :length[slot]]`` is the request's prompt then its outputs, ``output`` marks
the outputs and ``first`` an output's first occurrence. A slot is filled from the host's tokens when
a request first samples, and afterwards only from the sampled token tensor on the device, in stream
order, so a step with penalties stays in the asynchronous pipeline (the host never reads tokens for
it). Applying the penalties gathers the logits at those positions, and writes them back with one
scatter (repetition: duplicates write the same value) and one scatter-add (presence once per
distinct output token, frequency once per output): work in the history's length plus one copy of
the [N, V] logits, instead of several passes over a dense [N, V] count table. Memory: 10 bytes per
history position per penalized request in flight (prompt plus ``max_tokens``); the table grows by
doubling, and a slot is freed when its request finishes.

Meanings (as vLLM and transformers): ``repetition_penalty`` r divides positive logits by r and
multiplies negative ones by r for every token in the prompt or the output so far;
``presence_penalty`` p and ``frequency_penalty`` f subtract ``p * (count > 0) + f * count`` with
counts of the output only (the prompt does not count, as in vLLM and OpenAI).
"""

from __future__ import annotations

import torch

from sagellm_core.request import Request

SPARE_POSITIONS = 4  # a step in flight may sample one token past max_tokens (dropped later)


def _on(values: list, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class PenaltyState:
    """The device slot table of token histories and the penalty arithmetic over it."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.tokens: torch.Tensor | None = None  # [capacity, width] int64
        self.output: torch.Tensor | None = None  # [capacity, width] bool: an output position
        self.first: torch.Tensor | None = None  # [capacity, width] bool: an output's first occurrence
        self.length: torch.Tensor | None = None  # [capacity] int64

    @property
    def capacity(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    def forget(self, request_id: str) -> None:
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.free.append(slot)

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` [N, V] with every penalized row's penalties applied (a new tensor when any)."""
        rows = [i for i, r in enumerate(requests) if r.params.needs_penalties]
        if not rows:
            return logits
        device = logits.device
        slots = _on([self._slot(requests[i], device) for i in rows], device)
        assert self.tokens is not None and self.output is not None and self.first is not None
        assert self.length is not None
        params = [requests[i].params for i in rows]
        index = None if len(rows) == len(requests) else _on(rows, device)
        x = logits if index is None else logits.index_select(0, index)
        tokens = self.tokens.index_select(0, slots)
        valid = torch.arange(self.width, device=device).unsqueeze(0) < self.length.index_select(0, slots).unsqueeze(1)
        positions = torch.where(valid, tokens, tokens[:, :1])  # padding repeats the first prompt token
        out = None
        if any(p.repetition_penalty != 1.0 for p in params):
            repetition = _on([p.repetition_penalty for p in params], device, x.dtype).unsqueeze(1)
            values = x.gather(1, positions)
            out = x.scatter(1, positions, torch.where(values > 0, values / repetition, values * repetition))
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            presence = _on([p.presence_penalty for p in params], device, x.dtype).unsqueeze(1)
            frequency = _on([p.frequency_penalty for p in params], device, x.dtype).unsqueeze(1)
            output = self.output.index_select(0, slots) & valid
            first = self.first.index_select(0, slots) & valid
            delta = -(frequency * output.to(x.dtype) + presence * first.to(x.dtype))
            out = (x.clone() if out is None else out).scatter_add_(1, positions, delta)
        assert out is not None
        return out if index is None else logits.index_copy(0, index, out)

    def record(self, requests: list[Request], token_ids: torch.Tensor) -> None:
        """Append each penalized request's sampled token (``token_ids`` [N] on the device)."""
        rows = [i for i, r in enumerate(requests) if r.request_id in self.slots]
        if not rows or self.tokens is None:
            return
        assert self.output is not None and self.first is not None and self.length is not None
        device = token_ids.device
        slots = _on([self.slots[requests[i].request_id] for i in rows], device)
        sampled = token_ids if len(rows) == token_ids.shape[0] else token_ids.index_select(0, _on(rows, device))
        length = self.length.index_select(0, slots)
        valid = torch.arange(self.width, device=device).unsqueeze(0) < length.unsqueeze(1)
        seen = ((self.tokens.index_select(0, slots) == sampled.unsqueeze(1)) & self.output.index_select(0, slots)
                & valid).any(dim=1)
        position = length.clamp(max=self.width - 1)
        self.tokens.index_put_((slots, position), sampled)
        self.output.index_put_((slots, position), torch.ones_like(seen))
        self.first.index_put_((slots, position), ~seen)
        self.length.index_put_((slots,), length + 1)

    def _slot(self, request: Request, device: torch.device) -> int:
        slot = self.slots.get(request.request_id)
        if slot is not None:
            return slot
        needed = request.num_prompt_tokens + request.max_tokens + SPARE_POSITIONS
        if not self.free or needed > self.width:
            self._grow(device, needed, bool(self.free))
        slot = self.slots[request.request_id] = self.free.pop()
        self._fill(slot, request, device)
        return slot

    def _grow(self, device: torch.device, width: int, same_rows: bool) -> None:
        rows, old_width = self.capacity, self.width
        new_rows = rows if same_rows else max(4, 2 * rows)
        new_width = max(width, old_width)
        tokens = torch.zeros((new_rows, new_width), dtype=torch.int64, device=device)
        output = torch.zeros((new_rows, new_width), dtype=torch.bool, device=device)
        first = torch.zeros((new_rows, new_width), dtype=torch.bool, device=device)
        length = torch.zeros(new_rows, dtype=torch.int64, device=device)
        if self.tokens is not None and self.output is not None and self.first is not None:
            tokens[:rows, :old_width].copy_(self.tokens)
            output[:rows, :old_width].copy_(self.output)
            first[:rows, :old_width].copy_(self.first)
            length[:rows].copy_(self.length)  # type: ignore[arg-type]
        self.tokens, self.output, self.first, self.length = tokens, output, first, length
        self.free.extend(range(new_rows - 1, rows - 1, -1))

    def _fill(self, slot: int, request: Request, device: torch.device) -> None:
        """A new slot from the host's tokens: the prompt, and outputs already read (a request that
        resumes after preemption)."""
        assert self.tokens is not None and self.output is not None and self.first is not None
        assert self.length is not None
        outputs = list(request.prior_output_ids)
        history = list(request.prompt_token_ids) + outputs
        flags = [False] * request.num_prompt_tokens + [True] * len(outputs)
        seen: set[int] = set()
        firsts = [False] * request.num_prompt_tokens
        for token in outputs:
            firsts.append(token not in seen)
            seen.add(token)
        count = len(history)
        self.tokens[slot, :count].copy_(_on(history, device))
        self.output[slot].zero_()
        self.first[slot].zero_()
        self.output[slot, :count].copy_(_on(flags, device, torch.bool))
        self.first[slot, :count].copy_(_on(firsts, device, torch.bool))
        self.length[slot] = count
