"""Token bitmasks (32 tokens per int32 word, bit i of word w allows token 32 * w + i) and their
application to logits.

* CPU: the constrained rows' bitmask becomes an additive 0 / -inf mask through a byte look-up table,
  added in one numpy pass (`apply_bitmask_host`).
* Accelerators: a host buffer with one row per logits row (unconstrained rows all ones) reused across
  steps (`BitmaskStaging`; pinned on CUDA, so its single copy to the device never waits for the
  forward pass queued before it), then one fused unpack-and-fill on the device: the backend's
  `BitmaskOp` (a Triton kernel on CUDA) or `mask_logits` (torch).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

BitmaskOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits [N, V] float on the device, words [N, W] int32 on the device)`` -> a new tensor equal to
``logits`` except -inf where a token's bit is clear and at every id >= 32 * W. See
`Backend.bitmask_op`."""

_BIT_VALUES: dict[torch.device, torch.Tensor] = {}


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


# ---- the host (CPU) path -------------------------------------------------------------------------
def unpack_host(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """The bool [rows, vocab_size] array of a host [rows, words] int32 bitmask."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little").view(np.bool_)
    if bits.shape[1] < vocab_size:  # the model's vocabulary is padded past the tokenizer's
        bits = np.pad(bits, ((0, 0), (0, vocab_size - bits.shape[1])))
    return bits[:, :vocab_size]


def _bias_table() -> np.ndarray:
    """[256, 8] float32: for each byte value, 0.0 where its bit is set (allowed) and -inf where not."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool)
    return np.where(bits, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)


_BIAS = _bias_table()


def bias_host(bitmask: torch.Tensor, vocab_size: int) -> np.ndarray:
    """The float32 [rows, vocab_size] additive mask (0 allowed, -inf not) of a host int32 bitmask:
    one table look-up per byte, 8 floats each."""
    rows = bitmask.shape[0]
    bias = np.take(_BIAS, bitmask.numpy().view(np.uint8), axis=0).reshape(rows, -1)
    if bias.shape[1] < vocab_size:  # the model's vocabulary is padded past the tokenizer's
        bias = np.pad(bias, ((0, 0), (0, vocab_size - bias.shape[1])), constant_values=-np.inf)
    return bias[:, :vocab_size]


def apply_bitmask_host(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """CPU ``logits`` [N, V] with the disallowed tokens of ``rows`` at -inf, as a new tensor (the
    model's logits may be an inference-mode tensor, which cannot change in place). ``bitmask``
    [len(rows), words] int32: row k belongs to ``rows[k]``. One additive-mask pass (7x faster than
    unpacking to bools and selecting, on the 2-core machine)."""
    values = logits.numpy()
    bias = bias_host(bitmask, logits.shape[1])
    if len(rows) == logits.shape[0] and values.dtype == np.float32:
        np.add(bias, values, out=bias)
        return torch.from_numpy(bias)
    out = values.copy()
    out[rows] = values[rows] + bias
    return torch.from_numpy(out)


# ---- the device path -----------------------------------------------------------------------------
def _bit_values(device: torch.device) -> torch.Tensor:
    """int32 [32]: 1 << i (bit 31 is the sign bit)."""
    values = _BIT_VALUES.get(device)
    if values is None:
        bits = [1 << i for i in range(31)] + [-(1 << 31)]
        values = _BIT_VALUES[device] = torch.tensor(bits, dtype=torch.int32, device=device)
    return values


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bool [rows, vocab_size] tensor of a [rows, words] int32 bitmask, on its device (ids past
    32 * words are not allowed)."""
    bits = (words.unsqueeze(-1) & _bit_values(words.device)).ne(0).view(words.shape[0], -1)
    if bits.shape[1] < vocab_size:  # the model's vocabulary is padded past the tokenizer's
        bits = torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)
    return bits[:, :vocab_size]


def mask_logits(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """The generic `BitmaskOp` in torch: unpack on the device, then one ``where``."""
    allowed = allowed_tokens(words, logits.shape[1])
    return torch.where(allowed, logits, float("-inf"))  # a Python scalar: no host-to-device copy


def fill_free_rows(bitmask: torch.Tensor, constrained: list[int]) -> None:
    """All ones (every token allowed) in the rows of ``bitmask`` not in ``constrained``."""
    if len(constrained) == bitmask.shape[0]:
        return
    free = np.ones(bitmask.shape[0], dtype=bool)
    free[constrained] = False
    bitmask.numpy()[free] = -1


class BitmaskStaging:
    """The host buffer masks are written into, reused across steps (llguidance writes every word of
    the rows it fills).

    For CUDA logits it is pinned and copied with one non-blocking copy: a pageable copy goes through
    the driver's staging memory and may wait for the work queued before it (the forward pass), and
    costs a host memcpy. An event recorded after that copy keeps the next step from refilling the
    buffer before the copy has landed (normally long done: the engine reads the step's tokens, which
    the device produces after the copy, before it fills the next masks). Other accelerators get a
    fresh pageable buffer each step; the CPU reuses a plain one.
    """

    def __init__(self) -> None:
        self._host = torch.empty((0, 0), dtype=torch.int32)
        self._pinned = False
        self._copied: Any = None  # torch.cuda.Event of the last copy out of the pinned buffer

    def take(self, rows: int, words: int, device: torch.device) -> torch.Tensor:
        """A [rows, words] int32 host buffer for masks that go to ``device``, free to overwrite."""
        if device.type not in ("cpu", "cuda"):
            return torch.empty((rows, words), dtype=torch.int32)
        pinned = device.type == "cuda"
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if self._pinned != pinned or self._host.shape[0] < rows or self._host.shape[1] != words:
            size = max(rows, 2 * self._host.shape[0] if self._pinned == pinned else 0)
            self._host = torch.empty((size, words), dtype=torch.int32, pin_memory=pinned)
            self._pinned = pinned
        return self._host[:rows]

    def to_device(self, bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``bitmask`` (from `take`) copied to ``device`` without waiting; the buffer is not handed
        out again before the copy has landed."""
        words = bitmask.to(device, non_blocking=True)
        if device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))
            self._copied = copied
        return words
