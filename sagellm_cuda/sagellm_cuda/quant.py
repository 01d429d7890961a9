"""FP8 (E4M3) linear layers for Hopper GPUs through ``torch._scaled_mm``.

Weights: E4M3 codes with one float32 scale per output channel (`sagellm_core.quant.weights`), stored
[N, K] row-major and handed to the GEMM as its transpose, a column-major [K, N] ``mat2`` as cuBLASLt
wants. Activations: quantized per token on the fly (row absolute maximum -> 448), so ``scale_a`` is
[M, 1] and ``scale_b`` is [1, N] float32 ("row-wise" scaling, SM 9.0+). The GEMM accumulates in fp32
and writes bf16; the bias is added after it in the model dtype. Up to `GEMV_MAX_ROWS` rows (decode
at small batch) the activations stay in the model dtype and `fp8_gemv` reads the weights once.
"""

from __future__ import annotations

import torch

from sagellm_core.quant.weights import FP8_DTYPE, FP8_MAX, QuantizedWeight

MIN_CAPABILITY = (9, 0)
ALIGNMENT = 16  # _scaled_mm needs K and N divisible by 16
GEMV_MAX_ROWS = 16  # rows up to which the weight-only kernel (`sagellm_cuda.fp8_gemv`) runs


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row E4M3 quantization of a [M, K] tensor: (codes [M, K], float32 scales [M, 1])."""
    scales = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX
    codes = (x.float() / scales).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


class Fp8Linear(torch.nn.Module):
    """``x @ w.T + b`` with E4M3 weights (per-channel scales) and dynamic per-token E4M3 activations."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        from sagellm_cuda.fp8_gemv import fp8_gemv  # Triton: imported where a CUDA layer is built

        self._gemv = fp8_gemv
        if qw.kind != "fp8":
            raise ValueError(f"Fp8Linear needs an fp8 weight, got {qw.kind}")
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.dtype = dtype
        self.register_buffer("qweight", qw.codes.contiguous())  # [N, K]; .t() is the column-major mat2
        self.register_buffer("weight_scale", qw.scales.float().reshape(1, -1).contiguous())
        self.register_buffer("bias", None if qw.bias is None else qw.bias.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= GEMV_MAX_ROWS and rows.dtype in (torch.bfloat16, torch.float16):
            out = self._gemv(rows, self.qweight, self.weight_scale.view(-1))
        else:
            codes, scales = quantize_rows(rows)
            out = torch._scaled_mm(codes, self.qweight.t(), scale_a=scales, scale_b=self.weight_scale,
                                   out_dtype=torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor [N, K] in float8 standing for the weight (shape and dtype only, no data)."""
        return torch.empty((self.out_features, self.in_features), dtype=self.qweight.dtype, device="meta")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def fp8_supported(device: torch.device) -> bool:
    """Row-wise scaled FP8 GEMMs: CUDA devices of compute capability 9.0 (Hopper) or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def make_fp8_linear(qw: QuantizedWeight, dtype: torch.dtype) -> torch.nn.Module | None:
    """`sagellm_core.quant.weights.LinearFactory` for fp8; None for shapes the GEMM does not take."""
    if qw.in_features % ALIGNMENT or qw.out_features % ALIGNMENT or not fp8_supported(qw.codes.device):
        return None
    return Fp8Linear(qw, dtype)
