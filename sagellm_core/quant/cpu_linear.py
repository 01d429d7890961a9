"""Weight-only int8 / int4 linear layers for the CPU through torch's packed kernels.

``torch.ops.aten._weight_int8pack_mm`` (int8 codes, per-channel scales) and
``_weight_int4pack_mm_for_cpu`` (int4 codes packed by ``_convert_weight_to_int4pack_for_cpu``,
group-wise scales and zeros). Both run with bf16 activations: with fp32 activations these kernels
took 7-14x longer than with bf16 on this machine (AVX2, one thread: a 1536x576 int8 GEMV 2.1 ms in
fp32, 0.17 ms in bf16; the fp32 dense GEMV 0.26 ms). torchao 0.18's int8 weight-only layer measured
0.54 ms on the same shape, so the aten ops are called directly. Inputs and outputs keep the model's
dtype; only the GEMM runs in bf16 (its accumulation is fp32 inside the kernels).
"""

from __future__ import annotations

import torch

from sagellm_core.quant.weights import LinearFactory, QuantizedWeight

COMPUTE_DTYPE = torch.bfloat16


class _WeightOnlyLinear(torch.nn.Module):
    """Shared shape handling: flatten to [M, K] in bf16, run the kernel, add the bias, restore."""

    def __init__(self, qw: QuantizedWeight) -> None:
        super().__init__()
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.kind = qw.kind
        self.register_buffer("bias", None if qw.bias is None else qw.bias.float(), persistent=False)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        out = self._matmul(rows.contiguous()).to(x.dtype)
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
        """Bytes a forward reads for the weight (codes and scales)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "bias")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """int8 codes [N, K] with one scale per output channel."""

    def __init__(self, qw: QuantizedWeight) -> None:
        if qw.kind != "int8":
            raise ValueError(f"Int8WeightOnlyLinear needs an int8 weight, got {qw.kind}")
        super().__init__(qw)
        self.register_buffer("qweight", qw.codes.contiguous())
        self.register_buffer("scales", qw.scales.to(COMPUTE_DTYPE).contiguous())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """int4 codes packed for the CPU kernel; per group ``w = (code - 8) * scale + zero``, where
    ``zero = offset + 8 * scale`` (the kernel's convention, tinygemm's)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        if qw.kind != "int4" or qw.group_size is None or qw.offsets is None:
            raise ValueError(f"Int4WeightOnlyLinear needs an int4 weight with groups, got {qw.kind}")
        super().__init__(qw)
        self.group_size = qw.group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32).contiguous(), 1)
        self.register_buffer("qweight", packed)
        scales = qw.scales.float()
        zeros = qw.offsets.float() + 8.0 * scales
        # [K / group, N, 2]: (scale, zero) per group and output channel
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales.t(), zeros.t()], dim=-1).to(COMPUTE_DTYPE).contiguous())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales_and_zeros)


def int4_supported(qw: QuantizedWeight) -> bool:
    """Shapes the packed int4 kernel takes: whole groups of 32, 64, 128 or 256 inputs."""
    return (qw.group_size in (32, 64, 128, 256) and qw.in_features % qw.group_size == 0
            and qw.in_features % 2 == 0)


def make_int8(qw: QuantizedWeight, dtype: torch.dtype) -> torch.nn.Module:
    return Int8WeightOnlyLinear(qw)


def make_int4(qw: QuantizedWeight, dtype: torch.dtype) -> torch.nn.Module | None:
    return Int4WeightOnlyLinear(qw) if int4_supported(qw) else None


def cpu_quantized_linear(kind: str) -> LinearFactory | None:
    """The CPU backend's factory for ``kind`` (int8, int4), or None (fp8: de-quantized fallback)."""
    return {"int8": make_int8, "int4": make_int4}.get(kind)
