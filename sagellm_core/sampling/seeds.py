"""Seeds and keyed random numbers: one 63-bit key per row and token position, so a seeded request's
draws do not depend on the rest of the batch, on every backend and in every sampling path."""

from __future__ import annotations

import torch

from sagellm_core.request import Request
from sagellm_core.sampling_params import GREEDY_EPSILON

_MASK64 = (1 << 64) - 1

__all__ = ["GREEDY_EPSILON", "is_greedy", "keyed_exponential", "mix64", "request_seed", "seed63"]


def mix64(x: int) -> int:
    """SplitMix64's finaliser, cut to 63 bits (an int64 tensor holds it)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def seed63(seed: int) -> int:
    """Any integer seed as one in [0, 2**63), the same on every backend: seeds already in range are
    kept; others (negative, or 2**70) are folded 64 bits at a time through `mix64`. Every
    generator (torch's ``manual_seed``, numpy's PCG64, the row keys) takes this value.
    Raises `TypeError` for a non-integer (the engine then fails that request alone)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if 0 <= seed < 1 << 63:
        return seed
    value = 2 * seed if seed >= 0 else -2 * seed - 1  # zigzag: distinct non-negative values
    folded = 0
    while True:
        folded = mix64(folded ^ (value & _MASK64))
        value >>= 64
        if not value:
            return folded


def request_seed(request: Request) -> int:
    """The seed of one of the ``n`` completions of a seeded request."""
    return seed63(seed63(request.params.seed) + request.index)  # type: ignore[arg-type]


def is_greedy(request: Request) -> bool:
    return request.params.temperature < GREEDY_EPSILON


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def keyed_exponential(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] (float32), a pure function of each row's key (int64 [rows]) and
    the column: SplitMix64 of ``key + (column + 1) * golden`` (int64 arithmetic wraps), its top 53
    bits as a uniform in (0, 1). Pure torch, so it runs on every device and inside graphs."""
    columns = torch.arange(1, vocab + 1, dtype=torch.int64, device=keys.device)
    z = keys.unsqueeze(1) + columns * _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    z = z ^ _shift_right(z, 31)
    uniform = (_shift_right(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))
    return uniform.log_().neg_().to(torch.float32)
