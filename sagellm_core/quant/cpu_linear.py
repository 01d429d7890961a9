"""Weight-only int8 / int4 linear layers for the CPU through torch's packed kernels.

``torch.ops.aten._weight_int8pack_mm`` (int8 codes, per-channel scales) and
``_weight_int4pack_mm_for_cpu`` (int4 codes packed by ``_convert_weight_to_int4pack_for_cpu``,
group-wise scales and zeros). Both run with bf16 activations: with fp32 activations these kernels
took 7-14x longer than with bf16 on this machine (AVX2, one thread: a 1536x576 int8 GEMV 2.1 ms in
fp32, 0.17 ms in bf16; the fp32 dense GEMV 0.26 ms). torchao 0.18's int8 weight-only layer measured
0.54 ms on the same shape, so the aten ops are called directly. Inputs and outputs keep the model's
dtype; only the GEMM runs in bf16 (its accumulation is fp32 inside the kernels).

The packed kernels win at a few rows (decode at small batch: they read 4 or 8 bits per weight) and
lose at many: on the 2-core AVX-512 VM (bf16 dot products in hardware), SmolLM2-135M's shapes took
1.3-2.2x (int4) and 1.9-3.2x (the int8 LM head) longer than a oneDNN bf16 GEMM over the same weights
at 32-64 rows, 1.9-3.3x at 2048 (prefill), and 0.4-0.7x at 1-4 rows. So each layer can also keep its
weight de-quantized (``dense_min_rows`` > 0) and run ``F.linear`` on it for steps of at least that
many tokens: in bf16 where the CPU has bf16 dot products (the kernel's weight rounded to bf16: one
more rounding, ~2^-9 relative, far below the int4 step), else in float32 (`dense_dtype`; on an
AVX2-only CPU bf16 GEMMs are emulated and slower than the packed kernels). The choice depends on the
row count only (never on timings), so outputs stay deterministic.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sagellm_core.quant.weights import LinearFactory, QuantizedWeight

COMPUTE_DTYPE = torch.bfloat16
DENSE_MIN_ROWS = 16
"""A suggested ``dense_min_rows``: the crossover measured for SmolLM2-135M's projections on a 2-core
VM with AVX-512 BF16 was 8-24 rows (see above). The default is 0 (off): the copy costs 2 bytes per
weight with bf16 instructions, 4 without (4x and 8x an int4 weight)."""


_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


def dense_dtype() -> torch.dtype:
    """The dtype of the de-quantized copies: bf16 on a CPU with bf16 dot products (AVX-512 BF16 or
    AMX), float32 elsewhere."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return torch.bfloat16 if any(getattr(torch.cpu, name, lambda: False)() for name in probes) else torch.float32


def weight_only_gemm(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, group_size: int,
                     dense: torch.Tensor | None, dense_min_rows: int) -> torch.Tensor:
    """``x [M, K] bf16`` times a weight-only weight, bf16 out: the GEMM over ``dense`` (in its dtype,
    `dense_dtype`) from ``dense_min_rows`` rows on, else the packed kernel (int4 with ``group_size``
    and ``params`` its scales and zeros, int8 without a group size and ``params`` its scales)."""
    if dense is not None and x.shape[0] >= dense_min_rows:
        return F.linear(x.to(dense.dtype), dense).to(COMPUTE_DTYPE)
    if group_size:
        return _INT4_MM(x, qweight, group_size, params)
    return _INT8_MM(x, qweight, params)


class _WeightOnlyLinear(torch.nn.Module):
    """Shared shape handling: flatten to [M, K] in bf16, run the kernel, add the bias, restore."""

    group_size = 0  # int4: the quantization group; 0: int8 (per channel)

    def __init__(self, qw: QuantizedWeight, dense_min_rows: int = 0) -> None:
        super().__init__()
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.kind = qw.kind
        self.dense_min_rows = dense_min_rows
        self.register_buffer("bias", None if qw.bias is None else qw.bias.float(), persistent=False)

    def kernel_params(self) -> torch.Tensor:
        """The packed kernel's scales (int8) or scales and zeros (int4)."""
        raise NotImplementedError

    def _keep_dense(self, weight: torch.Tensor) -> None:
        """Register the de-quantized float32 weight [N, K] as the ``dense`` buffer in `dense_dtype`
        (None when ``dense_min_rows`` is 0: the packed kernel always runs)."""
        dense = weight.to(dense_dtype()).contiguous() if self.dense_min_rows > 0 else None
        self.register_buffer("dense", dense, persistent=False)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K] bf16 @ w.T`` in bf16: the bf16 GEMM over ``dense`` from ``dense_min_rows`` rows
        on, the packed kernel below."""
        return weight_only_gemm(x, self.qweight, self.kernel_params(), self.group_size,  # type: ignore[arg-type]
                                self.dense, self.dense_min_rows)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        out = self.gemm(rows.contiguous()).to(x.dtype)
        bias: torch.Tensor | None = self.bias  # type: ignore[assignment]
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor [N, K] standing for the weight (shape and code dtype only, no data), for code
        that inspects ``module.weight`` (parameter counts of benchmark floors)."""
        codes: torch.Tensor = self.qweight  # type: ignore[assignment]
        return torch.empty((self.out_features, self.in_features), dtype=codes.dtype, device="meta")

    def weight_bytes(self) -> int:
        """Bytes a forward of a few rows reads for the weight (codes and scales; not ``dense``)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name not in ("bias", "dense"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """int8 codes [N, K] with one scale per output channel."""

    def __init__(self, qw: QuantizedWeight, dense_min_rows: int = 0) -> None:
        if qw.kind != "int8":
            raise ValueError(f"Int8WeightOnlyLinear needs an int8 weight, got {qw.kind}")
        super().__init__(qw, dense_min_rows)
        self.register_buffer("qweight", qw.codes.contiguous())
        scales = qw.scales.to(COMPUTE_DTYPE).contiguous()
        self.register_buffer("scales", scales)
        self._keep_dense(qw.codes.float() * scales.float()[:, None])  # the kernel's (bf16) scales

    def kernel_params(self) -> torch.Tensor:
        return self.scales  # type: ignore[return-value]


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """int4 codes packed for the CPU kernel; per group ``w = (code - 8) * scale + zero``, where
    ``zero = offset + 8 * scale`` (the kernel's convention, tinygemm's)."""

    def __init__(self, qw: QuantizedWeight, dense_min_rows: int = 0) -> None:
        if qw.kind != "int4" or qw.group_size is None or qw.offsets is None:
            raise ValueError(f"Int4WeightOnlyLinear needs an int4 weight with groups, got {qw.kind}")
        super().__init__(qw, dense_min_rows)
        self.group_size = qw.group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("qweight", packed)
        scales = qw.scales.float()
        zeros = qw.offsets.float() + 8.0 * scales
        # [K / group, N, 2]: (scale, zero) per group and output channel
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales.t(), zeros.t()], dim=-1).to(COMPUTE_DTYPE).contiguous())
        self._keep_dense(self._kernel_weight(qw.codes))

    def _kernel_weight(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 weight [N, K] the kernel computes with: ``(code - 8) * scale + zero`` with its
        bf16 scales and zeros."""
        n, k = codes.shape
        stored: torch.Tensor = self.scales_and_zeros  # type: ignore[assignment]
        params = stored.float()  # [K / group, N, 2]
        scale, zero = params[..., 0].t()[..., None], params[..., 1].t()[..., None]  # [N, K / group, 1]
        return ((codes.float() - 8.0).view(n, k // self.group_size, self.group_size) * scale + zero).view(n, k)

    def kernel_params(self) -> torch.Tensor:
        return self.scales_and_zeros  # type: ignore[return-value]


def int4_supported(qw: QuantizedWeight) -> bool:
    """Shapes the packed int4 kernel takes: whole groups of 32, 64, 128 or 256 inputs."""
    return (qw.group_size in (32, 64, 128, 256) and qw.in_features % qw.group_size == 0
            and qw.in_features % 2 == 0)


def make_int8(qw: QuantizedWeight, dtype: torch.dtype, dense_min_rows: int = 0) -> torch.nn.Module:
    """An `Int8WeightOnlyLinear` (the factory signature of `LinearFactory`)."""
    return Int8WeightOnlyLinear(qw, dense_min_rows)


def make_int4(qw: QuantizedWeight, dtype: torch.dtype, dense_min_rows: int = 0
              ) -> torch.nn.Module | None:
    """An `Int4WeightOnlyLinear`, or None for a shape the kernel does not take."""
    return Int4WeightOnlyLinear(qw, dense_min_rows) if int4_supported(qw) else None


def cpu_quantized_linear(kind: str, dense_min_rows: int = 0) -> LinearFactory | None:
    """The CPU backend's factory for ``kind`` (int8, int4), or None (fp8: de-quantized fallback);
    ``dense_min_rows``: see `DENSE_MIN_ROWS` (0, the default: packed kernels only, no de-quantized copy)."""
    factory = {"int8": make_int8, "int4": make_int4}.get(kind)
    return None if factory is None else functools.partial(factory, dense_min_rows=dense_min_rows)
