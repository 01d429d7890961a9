"""The batch sampler: bans and biases, penalties, logits processors, logprobs, filters, the draw.

Every stage is batched device work queued without reading the device, so a step using any
sampling parameter stays in the engine's asynchronous pipeline; the host reads tokens and logprobs
later through one asynchronous copy (`PendingSample.start_host_copy`)."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from sagellm_core.request import Request
from sagellm_core.sampling.draw import Drawer, FilteredSampler, FusedSampler
from sagellm_core.sampling.filters import filter_logits
from sagellm_core.sampling.logprobs import (FusedLogprobs, HostCopy, LogprobTensors, Logprobs, logprob_tensors,
                                            read_logprobs)
from sagellm_core.sampling.masks import apply_bans, apply_logit_bias
from sagellm_core.sampling.penalties import PenaltyState
from sagellm_core.sampling.seeds import is_greedy


@attrs.define
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


@attrs.define
class PendingSample:
    """Sampling queued on the device: one token per request in ``token_ids`` (not read yet) and the
    logprobs of the requests that asked (device tensors)."""

    requests: list[Request]
    token_ids: torch.Tensor
    logprobs: LogprobTensors | None = None

    def start_host_copy(self, copy: HostCopy) -> Callable[[], tuple[list[int], list[Logprobs | None]]]:
        """Start copying tokens and logprobs to the host (``copy``: `Backend.start_host_copy`);
        the returned function waits for those copies only."""
        tokens = copy(self.token_ids)
        logprobs = read_logprobs(self.logprobs, copy, len(self.requests))
        return lambda: (tokens(), logprobs())


def _blocking_copy(tensor: torch.Tensor) -> Callable[[], list[Any]]:
    return tensor.tolist


class Sampler:
    """Per-request state: penalty counts on the device and seeded requests' keys."""

    def __init__(self, seed: int = 0, fused: FusedSampler | None = None,
                 filtered: FilteredSampler | None = None, fused_logprobs: FusedLogprobs | None = None) -> None:
        self.seed = seed
        self.drawer = Drawer(seed, fused, filtered)
        self.fused_logprobs = fused_logprobs  # the backend's one-pass logprobs (`Backend.fused_logprobs`)
        self.penalties = PenaltyState()
        # Objects with ``apply(logits, requests) -> logits`` run after penalties, before sampling
        # (structured outputs' token masks: `sagellm_core.structured.StructuredOutputs`).
        self.logits_processors: list[Any] = []

    @property
    def fused(self) -> FusedSampler | None:
        return self.drawer.fused

    @property
    def compiles_kernels(self) -> bool:
        """Whether the backend supplied fused kernels (they may compile on first use:
        `sagellm_core.sampling.warm_up`)."""
        return self.drawer.fused is not None or self.drawer.filtered is not None or self.fused_logprobs is not None

    def forget(self, request_id: str) -> None:
        self.drawer.forget(request_id)
        self.penalties.forget(request_id)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """``logits`` [N, V] float32, one row per request (in order). Waits for the device."""
        return self.collect(self.launch(logits, requests))

    def collect(self, pending: PendingSample) -> SampleResult:
        """Read a launched sample: token ids and logprobs on the host (waits for the device)."""
        return SampleResult(*pending.start_host_copy(_blocking_copy)())

    def launch(self, logits: torch.Tensor, requests: list[Request], *, commit: bool = True) -> PendingSample:
        """Queue the sampling of one token per row of ``logits``; nothing waits for the device.
        ``commit=False`` leaves the penalty counts as they were (a trial launch)."""
        if not requests:
            return PendingSample([], torch.empty(0, dtype=torch.int64, device=logits.device))
        logits = self.process(logits, requests)
        logprobs = logprob_tensors(logits, requests, self.fused_logprobs)
        chosen = self._choose(logits, requests)
        if logprobs is not None:
            logprobs.choose(chosen)
        if commit:
            self.penalties.record(requests, chosen)
        return PendingSample(requests, chosen, logprobs)

    def process(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The logits the request's distribution comes from (what logprobs report): bans (bad
        words, stop ids before ``min_tokens``), ``logit_bias``, penalties, then logits processors."""
        logits = apply_bans(logits, requests)
        logits = apply_logit_bias(logits, requests)
        logits = self.penalties.apply(logits, requests)
        for processor in self.logits_processors:  # HOOK(structured outputs): token masks
            logits = processor.apply(logits, requests)
        return logits

    def launch_each(self, logits: torch.Tensor, requests: list[Request]
                    ) -> tuple[PendingSample, list[tuple[Request, Exception]]]:
        """`launch`, isolating failures: when the batch raises, each row is tried alone, the rows
        that raise are left out (returned with their errors) and the rest are launched together
        (their random streams then differ from a run without the failing row)."""
        try:
            return self.launch(logits, requests), []
        except Exception:  # find the rows that fail alone
            pass
        failed: list[tuple[Request, Exception]] = []
        good: list[int] = []
        for row, request in enumerate(requests):
            try:
                self.launch(logits[row: row + 1], [request], commit=False)
                good.append(row)
            except Exception as exc:
                failed.append((request, exc))
        rows = torch.tensor(good, dtype=torch.int64, device=logits.device)
        return self.launch(logits.index_select(0, rows), [requests[i] for i in good]), failed

    def _choose(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Top-k / top-p / min-p (at each row's temperature), then the draw at that temperature."""
        inverse = [0.0 if is_greedy(r) else 1.0 / r.params.temperature for r in requests]
        if any(r.params.needs_filtering for r in requests):
            if self.drawer.filtered is not None:
                return self.drawer.draw_filtered(logits, inverse, requests)
            temperatures = [1.0 / inv if inv > 0.0 else 1.0 for inv in inverse]
            logits = filter_logits(logits, [r.params.top_k for r in requests], [r.params.top_p for r in requests],
                                   [r.params.min_p for r in requests], temperatures)
        return self.drawer.draw(logits, inverse, requests)
