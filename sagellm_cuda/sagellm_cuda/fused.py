"""Fused Triton kernels for the elementwise glue of Llama-family decoder layers (bf16 / fp16 only).

transformers' module code spends about thirty small kernels per decoder layer between the matrix
products: RMSNorm (cast, pow, mean, add, rsqrt, mul, cast, mul), rotary embedding (slices, neg, cat,
muls, adds), SiLU(gate) * up and the residual adds. In a CUDA-graph-replayed batch-1 decode those
launches cost as much GPU time as the weights take to read. `patch_model` swaps, per module instance,
the forward of

- RMSNorm modules (class name ``*RMSNorm`` with ``weight`` and ``variance_epsilon``): one kernel,
  `rms_norm`. Any leading shape, so Qwen3's per-head ``q_norm`` / ``k_norm`` are covered too.
- gated MLPs (``gate_proj`` / ``up_proj`` / ``down_proj`` / SiLU ``act_fn``): one GEMM over the
  concatenated gate+up weight, then `silu_mul`, then ``down_proj``.
- Llama / Qwen2 / Qwen3 / Mistral attention: one GEMM over the concatenated q/k/v weight (and bias),
  then `rope_qkv_` rotates q and k in place in that GEMM's output in one launch (Qwen3: the per-head
  q/k RMSNorm is applied in the same launch), then the configured attention function and ``o_proj``.
- the decoder layers of those families: the residual add after attention and the post-attention
  RMSNorm become one kernel, `add_rms_norm`; the residual add after the MLP happens inside the
  ``down_proj`` GEMM (``addmm_`` into the residual) when ``SAGELLM_FUSED_RESIDUAL_GEMM=1``.

NOTE: every kernel reproduces transformers' rounding steps, not just its math: the RMSNorm computes in
fp32 (mean = sum times torch's fp32 factor), casts the normalised value to the input dtype, then
multiplies by the weight in that dtype (one rounding); rotary rounds ``q*cos``, ``rotate_half(q)*sin``
and their sum separately; SiLU is ``x / (1 + expf(-x))`` (libdevice expf, IEEE division), rounded
before the multiply by ``up``; the residual sum is rounded before it is normalised. Kernels launch with
``enable_fp_fusion=False``: Triton would otherwise contract ``x1*cos - x2*sin`` into one bf16 fma.
Results therefore equal transformers' bit for bit (rotary without q/k norm: always) except where fp32
reduction order or ``rsqrt`` precision flips the rounding of an intermediate (one unit in its last
place; after the weight multiply at most two units of the result's). The concatenated GEMMs may pick
other cuBLAS kernels than the separate ones, with their own rounding.

Concatenation keeps memory flat: ``q_proj.weight`` / ``k_proj.weight`` / ``v_proj.weight`` (and gate /
up) become views into the one concatenated tensor, and the old tensors are freed; it is skipped (the
module then stays unpatched) when a weight does not own its storage. fp32 models are never patched,
so they stay bit-comparable with transformers.

Safety net: each patched module is run once at patch time, before and after patching, on random
inputs (norms with random weights, attention with a recording stand-in attention function) and left
unpatched when the outputs disagree beyond half-precision rounding: a Gemma-style ``(1 + weight)``
norm, another activation, or a changed transformers forward are caught there. At call time a patched
forward falls back to the original for fp32 / CPU inputs, a KV ``Cache`` object, or training mode.

Measured on one NVIDIA H200 (bench/kernels/check_fused.py, GPU time per call inside a CUDA graph, bf16;
taken before fma contraction was turned off, which changes the rounding, not the memory traffic):
RMSNorm 11.1 -> 1.6 us at 1 x 4096 and 28.1 -> 2.5 us at 256 x 4096; rotary 18.3 -> 1.4 us (Llama-3-8B,
1 token), Qwen3 q/k norm + rotary 43.5 -> 1.9 us; SiLU*up 3.0 -> 1.6 us; q/k/v in one GEMM 24.9 -> 14.4 us
and gate/up 61.1 -> 56.3 us at batch 1 (Llama-3-8B). A Llama-3-8B decoder layer at 1 token: 185.7 ->
129.3 us; Qwen3-0.6B at 256 tokens: 166.3 -> 48.7 us. Engine, Llama-3-8B shape, batch 1, 128 + 128
tokens: 6.86 -> 5.08 ms per step (weight-read floor about 3.6 ms); Qwen3-0.6B shape, 256 x (512 + 256):
17.4 -> 11.7 ms per step, 14.3k -> 21.1k output tokens/s (both with the residual GEMM on).

CUDA-graph contract: no host syncs, no data-dependent allocation; grids derive from tensor shapes; the
row count is not a specialisation key (``do_not_specialize``), so a kernel compiled by the eager
warm-up serves every batch size a graph captures.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import types
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["patch_model", "rms_norm", "add_rms_norm", "silu_mul", "rope_qkv_"]

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # CPU tensors are fine under the interpreter

# Attention classes whose forward `_attention_forward` reproduces, with how each passes the sliding window
# to the attention function: not at all, ``self.sliding_window``, or ``config.sliding_window``.
_ATTENTION_FAMILIES = {
    "LlamaAttention": "none",
    "Qwen2Attention": "module",
    "Qwen3Attention": "module",
    "MistralAttention": "config",
}
_DECODER_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")
_MAX_NORM_WIDTH = 32768
# Decoder layers let down_proj's GEMM add the residual (``addmm_``) instead of a separate add kernel.
# Off by default: the GEMM adds in fp32 before its one rounding, transformers rounds the product first,
# so the outputs stop being bit-comparable. Kernel-level gain on an H200: ~1 us per layer at batch 1,
# 13 us per Llama-3-8B layer at 256 tokens; but the whole batch-1 Llama-3-8B step went 4.68 -> 4.78 ms
# with it on (cuBLAS picks a slower GEMV for addmm; bench/gpu_session.sh ab, same machine).
RESIDUAL_GEMM = os.environ.get("SAGELLM_FUSED_RESIDUAL_GEMM", "0") == "1"


# --------------------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    n_rows, n_cols, stride_x, stride_r, stride_o, stride_s, eps, mean_factor,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_RES: tl.constexpr,
):
    """out = weight * (x * rsqrt(mean(x^2) + eps)).to(dtype); with HAS_RES, x = (x + res) first (stored)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows64 * stride_s + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=1) * mean_factor
    rstd = tl.math.rsqrt(var + eps)
    y = (xf * rstd[:, None]).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    out = w[None, :] * y.to(tl.float32)
    tl.store(out_ptr + rows64 * stride_o + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(
    g_ptr, u_ptr, out_ptr, n_rows, n_cols, stride_g, stride_u, stride_o,
    BLOCK: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
):
    """out = silu(gate).to(dtype) * up, each product rounded to the dtype (as torch does)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if LIBDEVICE_EXP:  # expf, as torch's silu: x / (1 + expf(-x)) with an IEEE division
        e = libdevice.exp(-g)
    else:  # the Triton interpreter has no libdevice
        e = tl.exp(-g)
    s = tl.math.div_rn(g, 1.0 + e).to(out_ptr.dtype.element_ty)
    out = s.to(tl.float32) * u
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_tokens"])
def _rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
    n_tokens, n_q_heads, n_heads, stride_t, stride_c, stride_s, eps, q_factor, k_factor,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HB: tl.constexpr,
    NORM: tl.constexpr,
):
    """In place on one token's q and k heads (head h at columns [h*D, (h+1)*D) of the row):
    [NORM: per-head RMSNorm with the q or k weight,] then x*cos + rotate_half(x)*sin."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HB + tl.arange(0, HB)
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    mask = (heads < n_heads)[:, None] & dmask[None, :]
    ptr1 = qkv_ptr + t * stride_t + heads[:, None] * HEAD_DIM + d[None, :]
    ptr2 = ptr1 + HALF
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr2, mask=mask, other=0.0)
    dt = x1.dtype
    if NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        is_q1 = heads < n_q_heads
        var = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) * tl.where(is_q1, q_factor, k_factor)
        rstd = tl.math.rsqrt(var + eps)[:, None]
        is_q = is_q1[:, None]
        w1 = tl.where(is_q, tl.load(qw_ptr + d, mask=dmask, other=0.0)[None, :],
                      tl.load(kw_ptr + d, mask=dmask, other=0.0)[None, :]).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + d, mask=dmask, other=0.0)[None, :],
                      tl.load(kw_ptr + HALF + d, mask=dmask, other=0.0)[None, :]).to(tl.float32)
        x1 = (w1 * (f1 * rstd).to(dt).to(tl.float32)).to(dt)
        x2 = (w2 * (f2 * rstd).to(dt).to(tl.float32)).to(dt)
    c1 = tl.load(cos_ptr + t * stride_c + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_c + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_s + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_s + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): out1 = x1*c1 + (-x2)*s1, out2 = x2*c2 + x1*s2, each product rounded.
    o1 = (f1 * c1).to(dt).to(tl.float32) - (f2 * s1).to(dt).to(tl.float32)
    o2 = (f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)
    tl.store(ptr1, o1.to(dt), mask=mask)
    tl.store(ptr2, o2.to(dt), mask=mask)


# --------------------------------------------------------------------------------------------- wrappers


# NOTE: no mul+add -> fma contraction (Triton's default). LLVM shrinks ``(a.f32 * b.f32).to(bf16)`` to a
# bf16 multiply (exact), and with fusion on it then fuses ``x1*cos - x2*sin`` into one fma: one rounding
# instead of transformers' three, a one-unit difference in about a fifth of the rotary outputs (seen on an
# H200). These kernels are memory-bound; fma buys nothing here.
_EXACT = {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=4096)
def _mean_factor(rows: int, n: int) -> float:
    """torch's ``mean`` multiplies the fp32 sum by ``float(outputs) / float(numel)`` (fp32 division), which is
    1/n rounded to fp32 until rows * n passes 2**24; the kernels use the same factor."""
    return float(np.float32(max(rows, 1)) / np.float32(max(rows, 1) * n))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [rows, last dim] with a unit inner stride (a view where possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _norm_config(n: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    rows = max(1, min(16, 2048 // block_n))
    elems = block_n * rows
    warps = 1 if elems <= 256 else 2 if elems <= 512 else 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    return block_n, rows, warps


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm over the last dim: ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``."""
    n = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block_n, rows, warps = _norm_config(n)
    grid = (triton.cdiv(x2.shape[0], rows),)
    _rms_norm_kernel[grid](x2, x2, weight, out, out, x2.shape[0], n, x2.stride(0), 0, out.stride(0), 0, eps,
                           _mean_factor(x2.shape[0], n), BLOCK_N=block_n, ROWS=rows, HAS_RES=False,
                           num_warps=warps, **_EXACT)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` (rounded to the dtype) and ``rms_norm(s)``, in one pass: returns (s, normed)."""
    n = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual)
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block_n, rows, warps = _norm_config(n)
    grid = (triton.cdiv(x2.shape[0], rows),)
    _rms_norm_kernel[grid](x2, r2, weight, out, total, x2.shape[0], n, x2.stride(0), r2.stride(0), out.stride(0),
                           total.stride(0), eps, _mean_factor(x2.shape[0], n), BLOCK_N=block_n, ROWS=rows,
                           HAS_RES=True, num_warps=warps, **_EXACT)
    return total.view(x.shape), out.view(x.shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with torch's roundings; ``gate``/``up`` may be column slices of one tensor."""
    n = gate.shape[-1]
    g2 = _rows(gate)
    u2 = _rows(up)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    block = min(1024, triton.next_power_of_2(n))
    grid = (g2.shape[0], triton.cdiv(n, block))
    _silu_mul_kernel[grid](g2, u2, out, g2.shape[0], n, g2.stride(0), u2.stride(0), out.stride(0),
                           BLOCK=block, LIBDEVICE_EXP=not _INTERPRET, num_warps=4 if block >= 512 else 1, **_EXACT)
    return out.view(gate.shape)


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_q_heads: int, num_kv_heads: int,
              head_dim: int, q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
              eps: float = 0.0) -> None:
    """Rotate (and with ``q_weight``/``k_weight``, RMS-normalise first) the q and k heads of ``qkv`` in place.

    ``qkv`` [N, >= (Hq + Hkv) * D] (unit inner stride): the first Hq heads are q, the next Hkv are k,
    the rest (v) is untouched. ``cos``/``sin`` [N, D], one row per token, in ``qkv``'s dtype.
    """
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and head_dim % 2 == 0
    half = head_dim // 2
    half_pad = triton.next_power_of_2(half)
    n_heads = num_q_heads + num_kv_heads
    hb = min(16, triton.next_power_of_2(n_heads))
    grid = (qkv.shape[0], triton.cdiv(n_heads, hb))
    norm = q_weight is not None
    _rope_kernel[grid](qkv, cos, sin, q_weight if norm else cos, k_weight if norm else cos,
                       qkv.shape[0], num_q_heads, n_heads, qkv.stride(0), cos.stride(0), sin.stride(0), eps,
                       _mean_factor(qkv.shape[0] * num_q_heads, head_dim),
                       _mean_factor(qkv.shape[0] * num_kv_heads, head_dim),
                       HEAD_DIM=head_dim, HALF=half, HALF_PAD=half_pad, HB=hb, NORM=norm,
                       num_warps=4 if hb * half_pad >= 1024 else 2, **_EXACT)


# --------------------------------------------------------------------------------------------- forwards


def _fusable(x: torch.Tensor) -> bool:
    return x.dtype in HALF_DTYPES and (x.is_cuda or _INTERPRET)


def _rmsnorm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if _fusable(hidden_states) and hidden_states.dtype == self.weight.dtype:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


class _Fused:
    """Per-module state: the concatenated weight (and bias) and the views handed to the Linear modules."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, linears: list[Any]) -> None:
        self.weight = weight
        self.bias = bias
        self.linears = linears
        self.ptrs = [lin.weight.data_ptr() for lin in linears]
        self.sizes = [lin.weight.shape[0] for lin in linears]

    def intact(self) -> bool:
        """False once someone replaced a Linear's weight (``model.to``, ``load_state_dict(assign=True)``)."""
        return all(lin.weight.data_ptr() == p for lin, p in zip(self.linears, self.ptrs))


def _mlp_act(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``silu(gate_proj(x)) * up_proj(x)``: one GEMM over the concatenated weight, one fused kernel."""
    st: _Fused = self._sagellm_fused
    if st.weight is None or not st.intact():  # no concatenated weight: two GEMMs, still one fused SiLU*up
        return silu_mul(self.gate_proj(x), self.up_proj(x))
    gate_up = F.linear(x, st.weight, st.bias)
    inter = st.sizes[0]
    return silu_mul(gate_up[..., :inter], gate_up[..., inter:])


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not _fusable(x) or x.dtype != self.gate_proj.weight.dtype:
        return type(self).forward(self, x)
    return self.down_proj(_mlp_act(self, x))


def _token_rows(t: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    if tuple(t.shape[:-1]) != tuple(input_shape):
        t = t.expand(*input_shape, t.shape[-1])
    return _rows(t)


def _attention_interface(module: Any) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(module).__module__].eager_attention_forward
    impl = module.config._attn_implementation
    get = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
    if get is not None:
        return get(impl, eager)
    return eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]


def _attention_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Any = None,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    st: _Fused = self._sagellm_fused
    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    if (cos is None or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None
            or self.training or not _fusable(hidden_states) or hidden_states.dtype != st.weight.dtype
            or cos.dtype != hidden_states.dtype or sin.dtype != hidden_states.dtype
            or cos.shape[-1] != self.head_dim or not st.intact()):
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    nq, nk, _ = st.sizes
    qkv = F.linear(hidden_states, st.weight, st.bias)
    norms = self._sagellm_qk_norm
    rope_qkv_(qkv.view(-1, qkv.shape[-1]), _token_rows(cos, input_shape), _token_rows(sin, input_shape),
              nq // self.head_dim, nk // self.head_dim, self.head_dim,
              norms[0] if norms else None, norms[1] if norms else None, norms[2] if norms else 0.0)
    query = qkv[..., :nq].view(hidden_shape).transpose(1, 2)
    key = qkv[..., nq:nq + nk].view(hidden_shape).transpose(1, 2)
    value = qkv[..., nq + nk:].view(hidden_shape).transpose(1, 2)
    window = self._sagellm_window
    if window == "module":
        kwargs["sliding_window"] = self.sliding_window
    elif window == "config":
        kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
    attn_output, attn_weights = _attention_interface(self)(
        self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _decoder_layer_forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    norm = self.post_attention_layernorm
    if args or not _fusable(hidden_states) or hidden_states.dtype != norm.weight.dtype:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    residual, hidden_states = add_rms_norm(hidden_states, residual, norm.weight, norm.variance_epsilon)
    mlp = self.mlp
    if self._sagellm_residual_gemm and _patched_with(mlp, _mlp_forward) and mlp.down_proj.bias is None:
        # down_proj accumulates into the residual (a fresh tensor of add_rms_norm): the GEMM adds it in
        # fp32 before its one rounding, and no separate add kernel runs.
        act = _mlp_act(mlp, hidden_states)
        return residual.view(-1, residual.shape[-1]).addmm_(
            act.view(-1, act.shape[-1]), mlp.down_proj.weight.t()).view(residual.shape)
    return residual + mlp(hidden_states)


# --------------------------------------------------------------------------------------------- patching


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _concat_linears(linears: list[Any]) -> _Fused | None:
    """Move the Linears' weights (and biases) into one tensor; each Linear keeps a view of its rows."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    first = weights[0]
    if any(w.ndim != 2 or w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1]
           or not _owns_storage(w) for w in weights):
        return None
    has_bias = biases[0] is not None
    if any((b is not None) != has_bias for b in biases):
        return None
    if has_bias and any(b.dtype != first.dtype or b.device != first.device for b in biases):
        return None
    weight = torch.cat([w.detach() for w in weights])
    bias = torch.cat([b.detach() for b in biases]) if has_bias else None
    sizes = [w.shape[0] for w in weights]
    for lin, w_part, old in zip(linears, weight.split(sizes), weights):
        lin.weight = torch.nn.Parameter(w_part, requires_grad=old.requires_grad)
    if bias is not None:
        for lin, b_part, old in zip(linears, bias.split(sizes), biases):
            lin.bias = torch.nn.Parameter(b_part, requires_grad=old.requires_grad)
    del weights, biases, first
    if weight.is_cuda:
        torch.cuda.empty_cache()  # hand the old tensors' segments back so the next concat can use them
    return _Fused(weight, bias, linears)


def _ulp_close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Every element within rounding of transformers' value: the normalised x may round the other way (one
    unit in its last place), which the weight multiply can turn into two units of the result's."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    eps = torch.finfo(ref.dtype).eps
    g, r = got.float(), ref.float()
    tol = 2 * eps * torch.maximum(g.abs(), r.abs()) + torch.finfo(ref.dtype).tiny
    return bool(torch.isfinite(g).all()) and bool(((g - r).abs() <= tol).all())


def _rel_close(got: Any, ref: Any, tol: float = 2e-2) -> bool:
    """Relative L2 distance below ``tol``: a rounding difference passes, a change of function does not."""
    if not isinstance(got, torch.Tensor) or not isinstance(ref, torch.Tensor) or got.shape != ref.shape:
        return False
    g, r = got.float(), ref.float()
    if not bool(torch.isfinite(g).all()):
        return False
    return float((g - r).norm()) <= tol * float(r.norm()) + 1e-6


def _randn(gen: torch.Generator, shape: tuple[int, ...], like: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(device=like.device, dtype=like.dtype)


_PROBE = "sagellm_fused_probe"
_probe_calls: list[tuple[Any, ...]] = []


def _probe_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Stand-in attention for the patch-time check: records what it is given, returns a function of it."""
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    _probe_calls.append((query.clone(), key.clone(), value.clone(), scaling, dropout, window, sorted(kwargs)))
    rep = query.shape[1] // key.shape[1]
    out = query + key.repeat_interleave(rep, 1) * value.repeat_interleave(rep, 1)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _probe_attention_active(configs: list[Any]) -> Iterator[None]:
    from transformers import AttentionInterface

    AttentionInterface.register(_PROBE, _probe_attention)
    saved = []
    for config in configs:
        attr = "_attn_implementation_internal" if hasattr(config, "_attn_implementation_internal") \
            else "_attn_implementation"
        saved.append((config, attr, getattr(config, attr, None)))
        setattr(config, attr, _PROBE)
    try:
        yield
    finally:
        for config, attr, value in saved:
            setattr(config, attr, value)
        _probe_calls.clear()


def _is_rmsnorm(m: Any) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.ndim == 1
            and isinstance(getattr(m, "variance_epsilon", None), (float, int)) and "forward" not in m.__dict__)


def _patch_rmsnorm(m: Any, dtype: torch.dtype, gen: torch.Generator) -> bool:
    w = m.weight
    if w.dtype != dtype or w.shape[0] > _MAX_NORM_WIDTH:
        return False
    saved = w.data
    try:
        w.data = _randn(gen, tuple(w.shape), w, 0.5) + 1.0  # a (1 + weight) norm must disagree
        ok = True
        for shape in ((3, 5, w.shape[0]), (1, w.shape[0]), (2, 3, 4, w.shape[0])):
            x = _randn(gen, shape, w, 3.0)
            ok = ok and _ulp_close(rms_norm(x, w, m.variance_epsilon), type(m).forward(m, x))
    except Exception as exc:  # a module whose forward our random input does not fit is left alone
        logger.debug("sagellm-cuda fused: RMSNorm check of %s failed: %s", type(m).__name__, exc)
        ok = False
    finally:
        w.data = saved
    if ok:
        m.forward = types.MethodType(_rmsnorm_forward, m)
    return ok


def _is_silu(act: Any) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _is_gated_mlp(m: Any) -> bool:
    return (all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(m, "act_fn", None)) and "forward" not in m.__dict__)


def _patch_mlp(m: Any, dtype: torch.dtype, gen: torch.Generator) -> bool:
    gate, up = m.gate_proj, m.up_proj
    if gate.weight.dtype != dtype or gate.weight.shape != up.weight.shape:
        return False
    x = _randn(gen, (1, 5, gate.in_features), gate.weight)
    ref = m(x)
    m._sagellm_fused = _concat_linears([gate, up]) or _Fused(None, None, [gate, up])
    m.forward = types.MethodType(_mlp_forward, m)
    if _rel_close(m(x), ref):
        return True
    del m.forward
    return False


def _is_attention(m: Any) -> bool:
    return (type(m).__name__ in _ATTENTION_FAMILIES and "forward" not in m.__dict__
            and all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and isinstance(getattr(m, "head_dim", None), int) and hasattr(m, "scaling") and hasattr(m, "config"))


def _patch_attention(m: Any, dtype: torch.dtype, gen: torch.Generator, fused_norms: set[int]) -> bool:
    d = m.head_dim
    q_norm, k_norm = getattr(m, "q_norm", None), getattr(m, "k_norm", None)
    if (q_norm is None) != (k_norm is None) or (type(m).__name__ == "Qwen3Attention") != (q_norm is not None):
        return False
    norms = None
    if q_norm is not None:
        if id(q_norm) not in fused_norms or id(k_norm) not in fused_norms \
                or q_norm.weight.shape[0] != d or k_norm.weight.shape[0] != d \
                or q_norm.variance_epsilon != k_norm.variance_epsilon:
            return False
        norms = (q_norm.weight, k_norm.weight, float(q_norm.variance_epsilon))
    w = m.q_proj.weight
    if w.dtype != dtype or d % 2 or m.q_proj.out_features % d or m.k_proj.out_features % d \
            or m.k_proj.out_features != m.v_proj.out_features:
        return False
    tokens = 5
    x = _randn(gen, (1, tokens, m.q_proj.in_features), w)
    angles = torch.rand((1, tokens, d // 2), generator=gen) * 6.3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(device=w.device, dtype=dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(device=w.device, dtype=dtype)
    kwargs = dict(position_embeddings=(cos, sin), attention_mask=None,
                  position_ids=torch.arange(tokens, device=w.device)[None])
    _probe_calls.clear()
    ref = type(m).forward(m, x, **kwargs)
    ref_calls = list(_probe_calls)
    fused = _concat_linears([m.q_proj, m.k_proj, m.v_proj])
    if fused is None:
        return False
    m._sagellm_fused = fused
    m._sagellm_qk_norm = norms
    m._sagellm_window = _ATTENTION_FAMILIES[type(m).__name__]
    m.forward = types.MethodType(_attention_forward, m)
    _probe_calls.clear()
    got = m(x, **kwargs)
    got_calls = list(_probe_calls)
    ok = (len(ref_calls) == len(got_calls) == 1 and isinstance(ref, tuple) and isinstance(got, tuple)
          and _rel_close(got[0], ref[0]))
    if ok:
        (rq, rk, rv, *rest), (gq, gk, gv, *grest) = ref_calls[0], got_calls[0]
        ok = rest == grest and all(_rel_close(a, b) for a, b in ((gq, rq), (gk, rk), (gv, rv)))
    if not ok:
        del m.forward
    return ok


def _is_decoder_layer(m: Any, fused_norms: set[int]) -> bool:
    return (type(m).__name__ in _DECODER_LAYERS and "forward" not in m.__dict__
            and id(getattr(m, "input_layernorm", None)) in fused_norms
            and id(getattr(m, "post_attention_layernorm", None)) in fused_norms
            and hasattr(m, "self_attn") and hasattr(m, "mlp"))


def _patch_decoder_layer(m: Any, dtype: torch.dtype, gen: torch.Generator) -> bool:
    attn = m.self_attn
    d = getattr(attn, "head_dim", None)
    w = m.post_attention_layernorm.weight
    if not isinstance(d, int) or w.dtype != dtype:
        return False
    tokens = 5
    x = _randn(gen, (1, tokens, w.shape[0]), w)
    angles = torch.rand((1, tokens, d // 2), generator=gen) * 6.3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(device=w.device, dtype=dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(device=w.device, dtype=dtype)
    kwargs = dict(attention_mask=None, position_ids=torch.arange(tokens, device=w.device)[None],
                  use_cache=False, position_embeddings=(cos, sin))
    ref = type(m).forward(m, x, **kwargs)
    if not isinstance(ref, torch.Tensor):  # older transformers return tuples: leave those layers alone
        return False
    m._sagellm_residual_gemm = RESIDUAL_GEMM
    m.forward = types.MethodType(_decoder_layer_forward, m)
    if _rel_close(m(x, **kwargs), ref):
        return True
    del m.forward
    return False


def _patched_with(m: Any, fn: Any) -> bool:
    return getattr(m.__dict__.get("forward"), "__func__", None) is fn


def _guarded(patch: Any, m: Any, *args: Any) -> bool:
    """Run a module's patch-and-check; any error leaves the module with its original forward."""
    try:
        return bool(patch(m, *args))
    except Exception as exc:
        logger.warning("sagellm-cuda fused: %s left unpatched (%s: %s)", type(m).__name__, type(exc).__name__, exc)
        m.__dict__.pop("forward", None)
        return False


def patch_model(model: Any, dtype: torch.dtype) -> list[str]:
    """Swap fused forwards into ``model``'s Llama-family modules; returns ``"<module name>: <kind>"`` per patch.

    Only for bf16 / fp16 models on a CUDA device (fp32 models are returned untouched, an empty list).
    Idempotent: modules patched before are skipped.
    """
    if dtype not in HALF_DTYPES:
        return []
    param = next(iter(model.parameters()), None)
    if param is None or not (param.is_cuda or _INTERPRET):
        return []
    gen = torch.Generator().manual_seed(0)
    patched: list[str] = []
    named = list(model.named_modules())
    fused_norms = {id(m) for _, m in named if _patched_with(m, _rmsnorm_forward)}
    configs = list({id(m.config): m.config for _, m in named
                    if type(m).__name__ in _ATTENTION_FAMILIES and getattr(m, "config", None) is not None}.values())
    with torch.no_grad(), _probe_attention_active(configs):
        for name, m in named:
            if _is_rmsnorm(m) and _patch_rmsnorm(m, dtype, gen):
                fused_norms.add(id(m))
                patched.append(f"{name}: rmsnorm")
        for name, m in named:
            if _is_gated_mlp(m) and _guarded(_patch_mlp, m, dtype, gen):
                patched.append(f"{name}: mlp")
        for name, m in named:
            if _is_attention(m) and _guarded(_patch_attention, m, dtype, gen, fused_norms):
                patched.append(f"{name}: attention")
        for name, m in named:
            if _is_decoder_layer(m, fused_norms) and _guarded(_patch_decoder_layer, m, dtype, gen):
                patched.append(f"{name}: decoder_layer")
    return patched
