"""Quantized linear weights, independent of any device: the formats and how to make them from floats.

Formats (``QuantizedWeight.kind``), for a weight [N out, K in]:

- ``int8``: symmetric per output channel, ``w = codes * scales[:, None]``; codes int8 in [-127, 127].
- ``int4``: asymmetric per group of ``group_size`` inputs, ``w = codes * scales + offsets`` (per group);
  codes uint8 in [0, 15] (GGUF's Q4_0 / Q4_1 blocks map onto it exactly: Q4_1 ``d*q + m``, Q4_0
  ``d*(q - 8)``).
- ``fp8``: float8 E4M3 codes with a per-output-channel scale, ``w = codes.float() * scales[:, None]``.
"""

from __future__ import annotations

from typing import Callable

import attrs
import torch

KINDS = ("int8", "int4", "fp8")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_GROUP_SIZE = 32  # GGUF's block size


LinearFactory = Callable[["QuantizedWeight", torch.dtype], "torch.nn.Module | None"]
"""What `Backend.quantized_linear` returns: builds a module computing ``x @ w.T + bias`` from a
quantized weight for a model in ``dtype`` (inputs and outputs in that dtype), or returns None for a
weight it cannot take (that layer then runs de-quantized)."""


@attrs.frozen(eq=False)
class QuantizedWeight:
    """One linear layer's weight (and bias) in a quantized format; see the module docstring."""

    kind: str = attrs.field(validator=attrs.validators.in_(KINDS))
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    group_size: int | None = None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these codes stand for."""
        if self.kind == "int4":
            assert self.offsets is not None and self.group_size is not None
            n, k = self.codes.shape
            grouped = self.codes.float().view(n, k // self.group_size, self.group_size)
            return (grouped * self.scales.float()[..., None] + self.offsets.float()[..., None]).view(n, k)
        return self.codes.float() * self.scales.float()[:, None]


def quantize_int8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedWeight:
    """Symmetric per-output-channel int8 (round to nearest)."""
    w = weight.detach().float()
    low, high = torch.aminmax(w, dim=1)
    scales = (torch.maximum(-low, high) / 127.0).clamp_(min=1e-12)
    codes = torch.div(w, scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", codes, scales, bias=_detached(bias))


def quantize_int4(weight: torch.Tensor, bias: torch.Tensor | None = None,
                  group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight:
    """Asymmetric int4 per group of ``group_size`` inputs: the group's min and max span codes 0..15."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the input width {k}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    low, high = torch.aminmax(w, dim=2)
    scales = ((high - low) / 15.0).clamp_(min=1e-12)
    codes = torch.sub(w, low[..., None]).div_(scales[..., None]).round_().clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", codes.view(n, k), scales, low, group_size, _detached(bias))


def quantize_fp8(weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedWeight:
    """E4M3 with per-output-channel scales (the row's absolute maximum maps to 448)."""
    w = weight.detach().float()
    low, high = torch.aminmax(w, dim=1)
    scales = (torch.maximum(-low, high) / FP8_MAX).clamp_(min=1e-12)
    codes = torch.div(w, scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedWeight("fp8", codes, scales, bias=_detached(bias))


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}


def quantize(kind: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize a float weight [N, K] to ``kind`` (one of `KINDS`)."""
    if kind not in QUANTIZERS:
        raise ValueError(f"quantization: must be one of {', '.join(KINDS)}; got {kind!r}")
    return QUANTIZERS[kind](weight, bias)


def _detached(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.detach()
