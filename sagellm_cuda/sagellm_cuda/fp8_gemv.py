"""Weight-only FP8 GEMM for the few rows of a decode step: ``x @ (codes * scale).T`` with bf16/fp16
activations and E4M3 weights de-quantized in registers.

At one to a few rows a linear layer is a pass over its weights: the floor is the weight bytes over
memory bandwidth. ``torch._scaled_mm`` needs the activations quantized first (several small
kernels per layer) and its tiles are sized for many rows; these kernels read each weight byte once
and launch once per layer. One row: [BLOCK_N, BLOCK_K] weight tiles times x in fp32 on the FMA units, summed
over K every tile (`Tiles.reduce_each`) or once at the end. Two to `MAX_ROWS` rows: ``tl.dot`` with
the rows padded to 16. The tile sizes come from `bench/kernels/fp8_gemv_bench.py` (one row:
``--per-shape`` on an H100, where one-row, one-warp programs won; several rows: ``--sweep`` on an H200).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the rows are padded to this for tl.dot


class Tiles(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    reduce_each: bool = False  # one row: reduce every [BLOCK_N, BLOCK_K] tile (fewer registers, longer tiles)


ROW_TILES = Tiles(block_n=1, block_k=4096, num_warps=1, num_stages=3, reduce_each=True)
"""One weight row per one-warp program (the H100 per-shape sweep, 2026-12-06 session 10: best or within 5% of
the best on each of Llama-3-8B's shapes, 114 vs 124 us over the four for the 2 x 2048, four-warp tiles);
`row_tiles` halves BLOCK_K where 4096 does not divide K."""


def row_tiles(k: int) -> Tiles:
    """`ROW_TILES`, with 2048-wide K tiles where 4096 leaves a masked remainder (Llama-3-8B's down
    projection, K = 14336: 32.3 us against about 33 us)."""
    return ROW_TILES if k % ROW_TILES.block_k == 0 else ROW_TILES._replace(block_k=ROW_TILES.block_k // 2)
DOT_TILES = Tiles(block_n=32, block_k=512, num_warps=4, num_stages=3)


@triton.jit
def _fp8_gemv_row_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, stride_wn,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_EACH: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if REDUCE_EACH:
        sums = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        if REDUCE_EACH:
            sums += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        else:
            acc += w.to(tl.float32) * x[None, :]
    if not REDUCE_EACH:
        sums = tl.sum(acc, axis=1)
    scale = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = sums * scale
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _fp8_gemv_dot_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
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


def fp8_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tiles: Tiles | None = None
             ) -> torch.Tensor:
    """``x [M, K] (bf16/fp16, M <= MAX_ROWS) @ (codes [N, K] e4m3 * scales [N]).T`` -> [M, N] in x's
    dtype, accumulated in fp32. ``tiles`` overrides the tuned tile sizes (for the sweep)."""
    m, k = x.shape
    n = codes.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"fp8_gemv takes at most {MAX_ROWS} rows, got {m}")
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 1:
        t = tiles or row_tiles(k)
        _fp8_gemv_row_kernel[(triton.cdiv(n, t.block_n),)](
            x, codes, scales, out, n, k, codes.stride(0), BLOCK_N=t.block_n, BLOCK_K=t.block_k,
            REDUCE_EACH=t.reduce_each, num_warps=t.num_warps, num_stages=t.num_stages)
    else:
        t = tiles or DOT_TILES
        _fp8_gemv_dot_kernel[(triton.cdiv(n, t.block_n),)](
            x, codes, scales, out, m, n, k, x.stride(0), codes.stride(0), out.stride(0), BLOCK_M=MAX_ROWS,
            BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)
    return out
