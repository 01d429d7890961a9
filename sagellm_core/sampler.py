"""Token sampling for a batch: penalties, min_tokens, greedy / temperature / top-k / top-p / min-p,
per-request seeded generators, and logprobs with top-k alternatives."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import numpy as np
import torch

from sagellm_core.request import Request


@attrs.define
class SampleResult:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


@attrs.define
class PendingSample:
    """Sampling queued on the device: one token per request in ``token_ids`` (not read yet)."""

    requests: list[Request]
    token_ids: torch.Tensor
    logprob_source: torch.Tensor | None


FusedSampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A backend's one-pass sampler: (logits [N, V] float32, inverse temperatures [N] (0 = greedy),
64-bit random keys [N]) -> token ids [N]. See `Backend.fused_sampler`."""

_MASK64 = (1 << 64) - 1
GREEDY_EPSILON = 1e-5
"""Temperatures below this sample greedily (vLLM's epsilon): dividing logits by a tiny temperature
overflows to inf and the softmax to NaN."""


def _mix64(x: int) -> int:
    """SplitMix64's finaliser, cut to 63 bits (an int64 tensor holds it)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def seed63(seed: int) -> int:
    """Any integer seed as one in [0, 2**63), the same on every backend: seeds already in range are
    kept; others (negative, or 2**70) are folded 64 bits at a time through `_mix64`. Every
    generator (torch's ``manual_seed``, numpy's PCG64, the fused sampler's keys) takes this value.
    Raises `TypeError` for a non-integer (the engine then fails that request alone)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if 0 <= seed < 1 << 63:
        return seed
    value = 2 * seed if seed >= 0 else -2 * seed - 1  # zigzag: distinct non-negative values
    folded = 0
    while True:
        folded = _mix64(folded ^ (value & _MASK64))
        value >>= 64
        if not value:
            return folded


def request_seed(request: Request) -> int:
    """The seed of one of the ``n`` completions of a seeded request."""
    return seed63(seed63(request.params.seed) + request.index)  # type: ignore[arg-type]


def is_greedy(request: Request) -> bool:
    return request.params.temperature < GREEDY_EPSILON


def _on(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a device tensor without waiting for the device's queued work."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _exponential(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device
                 ) -> torch.Tensor:
    """Exp(1) noise as -log(U): several times faster than ``Tensor.exponential_`` on the CPU."""
    return torch.rand(shape, generator=generator, device=device).log_().neg_()


def _cpu_exponential(out: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
    """Exp(1) noise into the float32 CPU tensor ``out``: numpy's PCG64 fills uniforms several times
    faster than torch's single-threaded mt19937 (the largest part of sampling a big vocabulary)."""
    generator.random(dtype=np.float32, out=out.numpy())
    return out.log_().neg_()


class Sampler:
    """Stateless except for the per-request generators of seeded requests and the engine's generator."""

    def __init__(self, seed: int = 0, fused: FusedSampler | None = None) -> None:
        self.seed = seed
        self.fused = fused
        self._fused_draws = 0
        self._fused_keys: dict[str, int] = {}
        self._generators: dict[tuple[str, str], torch.Generator] = {}
        self._default: dict[str, torch.Generator] = {}
        # CPU path: numpy generators seeded alike (per seeded request id, and the engine's), and a
        # reused noise buffer (a fresh 10+ MB tensor per step costs page faults).
        self._np_generators: dict[str, np.random.Generator] = {}
        self._np_default: np.random.Generator | None = None
        self._noise = torch.empty(0, dtype=torch.float32)
        # Objects with ``apply(logits, requests) -> logits`` run after penalties, before sampling
        # (structured outputs' token masks: `sagellm_core.structured.StructuredOutputs`).
        self.logits_processors: list[Any] = []

    def forget(self, request_id: str) -> None:
        self._fused_keys.pop(request_id, None)
        for key in [k for k in self._generators if k[0] == request_id]:
            del self._generators[key]
        self._np_generators.pop(request_id, None)

    def _np_generator(self, request: Request) -> np.random.Generator:
        if request.params.seed is None:
            if self._np_default is None:
                self._np_default = np.random.Generator(np.random.PCG64(seed63(self.seed)))
            return self._np_default
        generator = self._np_generators.get(request.request_id)
        if generator is None:
            generator = np.random.Generator(np.random.PCG64(request_seed(request)))
            self._np_generators[request.request_id] = generator
        return generator

    def _cpu_noise(self, rows: int, cols: int, request: Request) -> torch.Tensor:
        if self._noise.numel() < rows * cols:
            self._noise = torch.empty(rows * cols, dtype=torch.float32)
        return _cpu_exponential(self._noise[: rows * cols].view(rows, cols), self._np_generator(request))

    def _generator(self, request: Request, device: torch.device) -> torch.Generator:
        if request.params.seed is None:
            key = str(device)
            if key not in self._default:
                self._default[key] = torch.Generator(device=device).manual_seed(seed63(self.seed))
            return self._default[key]
        key = (request.request_id, str(device))
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(request_seed(request))
        return self._generators[key]

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """``logits`` [N, V] float32, one row per request (in order). Waits for the device."""
        return self.collect(self.launch(logits, requests))

    def launch(self, logits: torch.Tensor, requests: list[Request]) -> PendingSample:
        """Queue the sampling of one token per row of ``logits``; nothing waits for the device."""
        if not requests:
            return PendingSample([], torch.empty(0, dtype=torch.int64, device=logits.device), None)
        logits = self._apply_penalties(logits, requests)
        logits = self._apply_min_tokens(logits, requests)
        for processor in self.logits_processors:  # HOOK(structured outputs): token masks
            logits = processor.apply(logits, requests)
        logprob_info = self._logprob_source(logits, requests)
        greedy = [i for i, r in enumerate(requests) if is_greedy(r)]
        sampled = [i for i, r in enumerate(requests) if not is_greedy(r)]
        if self.fused is not None and not any(r.params.needs_filtering for r in requests):
            chosen = self._fused_draw(self.fused, logits, requests)
        elif not sampled:
            chosen = logits.argmax(dim=-1)
        elif not greedy:
            chosen = self._draw(self._filtered_probs(logits, requests), requests)
        else:
            chosen = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
            rows = _on(greedy, logits.device)
            chosen[rows] = logits[rows].argmax(dim=-1)
            rows = _on(sampled, logits.device)
            probs = self._filtered_probs(logits[rows], [requests[i] for i in sampled])
            chosen[rows] = self._draw(probs, [requests[i] for i in sampled])
        return PendingSample(requests, chosen, logprob_info)

    def collect(self, pending: PendingSample) -> SampleResult:
        """Read a launched sample: token ids and logprobs on the host (waits for the device)."""
        token_ids = pending.token_ids.tolist()
        return SampleResult(token_ids, self.logprobs(pending, token_ids))

    def logprobs(self, pending: PendingSample, token_ids: list[int]
                 ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Logprobs of the sampled ``token_ids`` (read from the device) for the requests that asked."""
        return self._logprobs(pending.logprob_source, pending.requests, token_ids)

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
                self.launch(logits[row: row + 1], [request])
                good.append(row)
            except Exception as exc:
                failed.append((request, exc))
        rows = torch.tensor(good, dtype=torch.int64, device=logits.device)
        return self.launch(logits.index_select(0, rows), [requests[i] for i in good]), failed

    def _fused_draw(self, fused: FusedSampler, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The backend's one-pass sampler. Seeded requests key each draw by seed and token position
        (batch-independent); the rest take consecutive keys after the engine seed."""
        keys = [self._fused_key(request) for request in requests]
        inverse = [0.0 if is_greedy(r) else 1.0 / r.params.temperature for r in requests]
        return fused(logits, _on(inverse, logits.device, torch.float32), _on(keys, logits.device, torch.int64))

    def _fused_key(self, request: Request) -> int:
        if is_greedy(request):
            return 0  # unused: greedy rows take the plain argmax
        if request.params.seed is None:
            self._fused_draws += 1
            return _mix64(seed63(self.seed)) ^ self._fused_draws
        base = self._fused_keys.get(request.request_id)
        if base is None:
            base = self._fused_keys[request.request_id] = _mix64(request_seed(request))
        return _mix64(base + request.num_prior_outputs)

    def _exp_noise(self, rows: int, cols: int, request: Request, device: torch.device) -> torch.Tensor:
        """Exp(1) noise [rows, cols] from ``request``'s generator (numpy's on the CPU, torch's elsewhere)."""
        if device.type == "cpu":
            return self._cpu_noise(rows, cols, request)
        return _exponential((rows, cols), self._generator(request, device), device)

    def _draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row. Seeded rows draw from their own generator (batch-independent); the
        rest share the engine generator in one batched exponential-race draw (no per-row launches)."""
        out = torch.empty(len(requests), dtype=torch.int64, device=probs.device)
        vocab = probs.shape[1]
        seeded = [j for j, r in enumerate(requests) if r.params.seed is not None]
        unseeded = [j for j, r in enumerate(requests) if r.params.seed is None]
        for j in seeded:
            out[j] = (probs[j] / self._exp_noise(1, vocab, requests[j], probs.device)[0]).argmax()
        if unseeded:
            noise = self._exp_noise(len(unseeded), vocab, requests[unseeded[0]], probs.device)
            if len(unseeded) == len(requests):
                out.copy_((probs / noise).argmax(dim=-1))
            else:
                rows = _on(unseeded, probs.device)
                out[rows] = (probs[rows] / noise).argmax(dim=-1)
        return out

    # ---- logits processing ---------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.needs_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            p = requests[i].params
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(requests[i].prompt_token_ids + requests[i].prior_output_ids)),
                                    device=logits.device, dtype=torch.int64)
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            outputs = requests[i].prior_output_ids
            if outputs and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(torch.tensor(outputs, device=logits.device), minlength=row.shape[0])
                counts = counts[: row.shape[0]].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.num_prior_outputs < r.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            banned = set(requests[i].params.stop_token_ids)
            if not requests[i].params.ignore_eos:
                banned |= requests[i].eos_token_ids
            banned_ids = [t for t in banned if 0 <= t < logits.shape[1]]
            if banned_ids:
                logits[i, banned_ids] = float("-inf")
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temps = _on([max(r.params.temperature, GREEDY_EPSILON) for r in requests], logits.device).unsqueeze(1)
        logits = logits / temps
        vocab = logits.shape[1]
        top_k = [r.params.top_k for r in requests]
        top_p = [r.params.top_p for r in requests]
        min_p = [r.params.min_p for r in requests]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
            k = _on([k if k > 0 else vocab for k in top_k], logits.device).unsqueeze(1)
            remove = ranks >= k
            sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
            p = _on(top_p, logits.device).unsqueeze(1)
            remove |= before >= p
            remove[:, 0] = False
            logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
        probs = logits.softmax(dim=-1)
        if any(m > 0 for m in min_p):
            threshold = _on(min_p, logits.device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    # ---- logprobs ------------------------------------------------------------------------------
    @staticmethod
    def _logprob_source(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor | None:
        if not any(r.params.logprobs is not None for r in requests):
            return None
        return logits.log_softmax(dim=-1)

    @staticmethod
    def _logprobs(source: torch.Tensor | None, requests: list[Request], token_ids: list[int]
                  ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        out: list[tuple[float, list[tuple[int, float]]] | None] = []
        for i, request in enumerate(requests):
            k = request.params.logprobs
            if source is None or k is None:
                out.append(None)
                continue
            row = source[i]
            top: list[tuple[int, float]] = []
            if k > 0:
                values, ids = row.topk(k)
                top = list(zip(ids.tolist(), values.tolist()))
            out.append((float(row[token_ids[i]]), top))
        return out
