"""Linear projections of the lean decoder (`sagellm_core.models.lean_decoder`): the math of the model's
own Linear modules without their module calls, and several projections of one input (q/k/v, gate/up)
fused into one quantized GEMM where that gives the same numbers.

The CPU's weight-only kernels (`sagellm_core.quant.cpu_linear`) compute each output channel from its
own weight row (accumulated over the input in fp32), so the rows of several weights stacked into one
packed weight give each output exactly what its own GEMM gave: one bf16 cast of the input, one kernel
call and one cast back instead of three of each. Dense float weights are never stacked (a BLAS GEMM of
another width may block the reduction differently). The de-quantized copies the weight-only modules
keep for steps of many rows (``dense``, `sagellm_core.quant.cpu_linear.DENSE_MIN_ROWS`) are stacked
alike: oneDNN's bf16 GEMM gave each row block of a stacked weight the bits of its own GEMM, and
`Projections` checks that on probe inputs of both paths before it fuses (a GEMM that differs, float32
on another CPU perhaps, leaves the projections unfused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sagellm_core.quant.cpu_linear import COMPUTE_DTYPE, Int4WeightOnlyLinear, Int8WeightOnlyLinear, weight_only_gemm

_EXACT_FROM_BF16 = (torch.float32, torch.bfloat16)  # bf16 values convert to these exactly
PROJECTION_TYPES = (torch.nn.Linear, Int4WeightOnlyLinear, Int8WeightOnlyLinear)


def unsupported_projection(module: torch.nn.Module) -> str | None:
    """Why ``module`` cannot run as a lean projection (None: it can)."""
    if type(module) not in PROJECTION_TYPES:
        return f"projection of type {type(module).__name__}"
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        return f"{type(module).__name__} with a replaced forward or hooks"
    return None


class _Dense:
    """``F.linear`` with the module's weight and bias (what ``torch.nn.Linear.forward`` computes)."""

    __slots__ = ("weight", "bias")

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.weight = linear.weight
        self.bias = linear.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``."""
        return residual + F.linear(x, self.weight, self.bias)


class _WeightOnly:
    """One weight-only kernel call over the stacked rows of one or more `_WeightOnlyLinear` modules:
    input cast to bf16, kernel, output cast back, bias added (each module's ``forward``, once). From
    ``dense_min_rows`` rows on, the GEMM over the stacked ``dense`` weights replaces the kernel."""

    __slots__ = ("kind", "qweight", "params", "group_size", "bias", "dense", "dense_min_rows")

    def __init__(self, modules: Sequence[Int4WeightOnlyLinear | Int8WeightOnlyLinear]) -> None:
        first = modules[0]
        self.kind = first.kind
        self.qweight = _stack([m.qweight for m in modules])  # type: ignore[misc]
        self.group_size = first.group_size
        # int4: [K / group, N, 2] scales and zeros, stacked along N; int8: [N] scales
        self.params = _stack([m.kernel_params() for m in modules], dim=1 if first.group_size else 0)
        biases = [m.bias for m in modules]
        self.bias = None if biases[0] is None else _stack(biases)  # type: ignore[arg-type]
        denses = [m.dense for m in modules]
        self.dense = None if denses[0] is None else _stack(denses)  # type: ignore[arg-type]
        self.dense_min_rows = first.dense_min_rows

    def gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows [T, K] bf16`` times the stacked weights, bf16 out (`_WeightOnlyLinear.gemm`)."""
        return weight_only_gemm(rows, self.qweight, self.params, self.group_size, self.dense, self.dense_min_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gemm(x.to(COMPUTE_DTYPE)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``; the kernel's bf16 output goes into the sum uncast where the sum
        promotes it to the residual's dtype exactly (float32 or bf16 residuals, no bias)."""
        if self.bias is not None or residual.dtype not in _EXACT_FROM_BF16 or x.dtype != residual.dtype:
            return residual + self(x)
        return residual + self.gemm(x.to(COMPUTE_DTYPE))


def _stack(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """One module's own tensor, or several concatenated (a new tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim)


def _fusable(modules: Sequence[torch.nn.Module]) -> bool:
    first = modules[0]
    if not isinstance(first, (Int4WeightOnlyLinear, Int8WeightOnlyLinear)):
        return False
    return all(type(m) is type(first) and m.in_features == first.in_features
               and getattr(m, "group_size", None) == getattr(first, "group_size", None)
               and (m.bias is None) == (first.bias is None) and (m.dense is None) == (first.dense is None)
               and m.dense_min_rows == first.dense_min_rows for m in modules)


class Projections:
    """Projections of one input ``x`` [T, K]: ``__call__`` returns their outputs [T, N_i] in order.

    Fused (one GEMM) when every module is weight-only of one kind, group size and bias presence, and
    the fused GEMM reproduces each module's output bit for bit on probe inputs (checked once, here);
    the outputs are then column slices of the one result. The modules' packed weights become row
    views of the fused one where the packing allows (no second copy of the codes)."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.widths = [int(m.out_features) for m in modules]  # type: ignore[arg-type]
        self.fused: _WeightOnly | None = None
        self.single: list[_Dense | _WeightOnly] = []
        if len(modules) > 1 and _fusable(modules):
            fused = _WeightOnly(modules)  # type: ignore[arg-type]
            if _same_outputs(fused, modules):
                self.fused = fused
                _share_rows(fused, modules)
        if self.fused is None:
            self.single = [_single(m) for m in modules]

    def stacked(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused output [T, sum N_i] (None when the projections are not fused)."""
        return None if self.fused is None else self.fused(x)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused is None:
            return [f(x) for f in self.single]
        return list(self.fused(x).split(self.widths, dim=-1))


@torch.inference_mode()
def _same_outputs(fused: _WeightOnly, modules: Sequence[torch.nn.Module], rows: Sequence[int] = (1, 7)) -> bool:
    """Whether the fused GEMM's column slices equal each module's own output, bit for bit, on random
    inputs of ``rows`` tokens (decode and prefill shapes take different kernel paths), and of
    ``dense_min_rows`` and a prefill-sized count where the GEMM over ``dense`` runs."""
    generator = torch.Generator().manual_seed(0)
    in_features = int(modules[0].in_features)  # type: ignore[arg-type]
    if fused.dense is not None:
        rows = (*rows, fused.dense_min_rows, max(fused.dense_min_rows, 67))
    for count in rows:
        x = torch.randn(count, in_features, generator=generator)
        parts = fused(x).split([int(m.out_features) for m in modules], dim=-1)  # type: ignore[arg-type]
        if not all(torch.equal(part, m(x)) for part, m in zip(parts, modules)):
            return False
    return True


def _share_rows(fused: _WeightOnly, modules: Sequence[torch.nn.Module]) -> None:
    """Make each module's ``qweight`` (and ``dense``) a row view of the fused tensor where equal."""
    names = ("qweight", "dense") if fused.dense is not None else ("qweight",)
    for name in names:
        stacked: torch.Tensor = getattr(fused, name)
        start = 0
        for module in modules:
            own: torch.Tensor = module._buffers[name]  # type: ignore[assignment]
            rows = stacked[start:start + own.shape[0]]
            if rows.shape == own.shape and torch.equal(rows, own):
                module._buffers[name] = rows
            start += own.shape[0]


def _single(module: torch.nn.Module) -> _Dense | _WeightOnly:
    if isinstance(module, (Int4WeightOnlyLinear, Int8WeightOnlyLinear)):
        return _WeightOnly([module])
    return _Dense(module)  # type: ignore[arg-type]


def projection(module: torch.nn.Module) -> _Dense | _WeightOnly:
    """One projection's callable ``x [T, K] -> [T, N]``."""
    return _single(module)
