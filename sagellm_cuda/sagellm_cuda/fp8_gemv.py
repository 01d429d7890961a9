"""Weight-only FP8 GEMM for the few rows of a decode step: ``x @ (codes * scale).T`` with bf16/fp16
activations and E4M3 weights de-quantized in registers.

At one to a few rows a linear layer is a pass over its weights: the floor is the weight bytes over
memory bandwidth. ``torch._scaled_mm`` needs the activations quantized first (several small
kernels per layer) and its tiles are sized for many rows; this kernel reads each weight byte once
and launches once per layer. Tiles: ``BLOCK_N`` output channels per program (enough programs to
fill the SMs at N = 4096), ``BLOCK_K`` of the reduction per iteration; the rows are padded to 16
for ``tl.dot``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the rows are padded to this for tl.dot
_BLOCK_N = 16
_BLOCK_K = 512


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k[None, :] < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & k_ok, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & k_ok, other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fp8_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [M, K] (bf16/fp16, M <= MAX_ROWS) @ (codes [N, K] e4m3 * scales [N]).T`` -> [M, N] in x's
    dtype, accumulated in fp32."""
    m, k = x.shape
    n = codes.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows, got {m}")
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, _BLOCK_N),)
    _fp8_gemv_kernel[grid](x, codes, scales, out, m, n, k, x.stride(0), codes.stride(0), out.stride(0),
                           BLOCK_M=MAX_ROWS, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=4, num_stages=3)
    return out
