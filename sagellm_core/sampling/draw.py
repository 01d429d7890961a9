"""Drawing one token per row: the exponential race ``argmax(x - log E)``, E ~ Exp(1) (Gumbel-max),
which samples softmax(x) exactly. Greedy rows take the argmax.

Noise: a backend's fused sampler (one pass over the logits; see `Backend.fused_sampler`) takes a
63-bit key per row. Without one, seeded rows draw keyed noise (`keyed_exponential`, the same keys),
so their tokens depend only on their seed and position, never on the batch; the other rows share the
engine's generator in one batched draw (numpy's PCG64 on the CPU: several times faster than torch's
mt19937 for a large vocabulary). No path loops over rows.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from sagellm_core.request import Request
from sagellm_core.sampling.seeds import is_greedy, keyed_exponential, mix64, request_seed, seed63

FusedSampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A backend's one-pass sampler: (logits [N, V] float32, inverse temperatures [N] (0 = greedy),
64-bit random keys [N]) -> token ids [N]. See `Backend.fused_sampler`."""
FilteredSampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor, torch.Tensor],
                           torch.Tensor]
"""A backend's sampler with top-k / top-p / min-p: `FusedSampler`'s arguments, then each row's k (a
host list), top-p and log(min-p). See `Backend.fused_filtered_sampler`."""


def on_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a device tensor without waiting for the device's queued work."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class Drawer:
    """Keys and generators of the draws; the engine's seed keys the unseeded rows."""

    def __init__(self, seed: int = 0, fused: FusedSampler | None = None,
                 filtered: FilteredSampler | None = None) -> None:
        self.seed = seed
        self.fused = fused
        self.filtered = filtered
        self._draws = 0
        self._bases: dict[str, int] = {}
        self._torch_default: dict[str, torch.Generator] = {}
        self._np_default: np.random.Generator | None = None
        self._noise = torch.empty(0, dtype=torch.float32)

    def forget(self, request_id: str) -> None:
        self._bases.pop(request_id, None)

    def key(self, request: Request) -> int:
        """Row key of ``request``'s next draw: from its seed and the position of the token drawn
        (batch-independent) when seeded; else consecutive values after the engine seed."""
        if is_greedy(request):
            return 0  # unused: greedy rows take the plain argmax
        if request.params.seed is None:
            self._draws += 1
            return mix64(seed63(self.seed)) ^ self._draws
        base = self._bases.get(request.request_id)
        if base is None:
            base = self._bases[request.request_id] = mix64(request_seed(request))
        return mix64(base + request.num_prior_outputs)

    def draw(self, x: torch.Tensor, inverse: list[float], requests: list[Request]) -> torch.Tensor:
        """One token per row of ``x`` [N, V]: argmax where ``inverse`` (inverse temperature) is 0,
        else a draw from softmax(x * inverse)."""
        device = x.device
        if self.fused is not None:
            keys = [self.key(r) for r in requests]
            return self.fused(x, on_device(inverse, device, torch.float32), on_device(keys, device, torch.int64))
        sampled = [i for i, inv in enumerate(inverse) if inv > 0]
        if not sampled:
            return x.argmax(dim=-1)
        out = x.argmax(dim=-1) if len(sampled) < len(requests) else torch.empty(len(requests), dtype=torch.int64,
                                                                                 device=device)
        seeded = [i for i in sampled if requests[i].params.seed is not None]
        unseeded = [i for i in sampled if requests[i].params.seed is None]
        if seeded:
            row_keys = on_device([self.key(requests[i]) for i in seeded], device, torch.int64)
            self._race(x, inverse, seeded, out, keyed_exponential(row_keys, x.shape[1]))
        if unseeded:
            self._race(x, inverse, unseeded, out, self._shared_noise(len(unseeded), x.shape[1], device))
        return out

    def draw_filtered(self, x: torch.Tensor, inverse: list[float], requests: list[Request]) -> torch.Tensor:
        """`draw` with each request's top-k / top-p / min-p, through the backend's filtered sampler
        (requires ``filtered``): no masked copy of ``x``."""
        assert self.filtered is not None
        device = x.device
        params = [r.params for r in requests]
        log_min_p = [math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in params]
        return self.filtered(x, on_device(inverse, device, torch.float32),
                             on_device([self.key(r) for r in requests], device, torch.int64),
                             [p.top_k for p in params], on_device([p.top_p for p in params], device, torch.float32),
                             on_device(log_min_p, device, torch.float32))

    @staticmethod
    def _race(x: torch.Tensor, inverse: list[float], rows: list[int], out: torch.Tensor, noise: torch.Tensor) -> None:
        inv = on_device([inverse[i] for i in rows], x.device, x.dtype).unsqueeze(1)
        if len(rows) == x.shape[0]:
            out.copy_((x * inv - noise.log()).argmax(dim=-1))
            return
        index = on_device(rows, x.device, torch.int64)
        out.index_copy_(0, index, (x.index_select(0, index) * inv - noise.log()).argmax(dim=-1))

    def _shared_noise(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise [rows, cols] from the engine's generator."""
        if device.type != "cpu":
            key = str(device)
            if key not in self._torch_default:
                self._torch_default[key] = torch.Generator(device=device).manual_seed(seed63(self.seed))
            return torch.rand((rows, cols), generator=self._torch_default[key], device=device).log_().neg_()
        if self._np_default is None:
            self._np_default = np.random.Generator(np.random.PCG64(seed63(self.seed)))
        if self._noise.numel() < rows * cols:  # reused: a fresh 10+ MB tensor per step costs page faults
            self._noise = torch.empty(rows * cols, dtype=torch.float32)
        out = self._noise[: rows * cols].view(rows, cols)
        self._np_default.random(dtype=np.float32, out=out.numpy())
        return out.log_().neg_()
