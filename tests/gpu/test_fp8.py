"""FP8 on a Hopper GPU: the ``torch._scaled_mm`` linear, the Triton kernels over an fp8 KV cache,
and an engine with FP8 weights and KV cache (needs CUDA; the linear needs SM 9.0+).

Error bounds (relative Frobenius norm of the difference):
- FP8 linear vs the same fp8 codes de-quantized to fp32 (weights, and per-token activations where
  the layer quantizes them: above `GEMV_MAX_ROWS` rows): <= 1% (only accumulation order and the bf16
  output rounding differ);
- FP8 linear vs the unquantized bf16 weight: <= 8% (two E4M3 roundings of 2^-4 relative each);
- Triton attention over an fp8 cache vs the reference op over the same fp8 cache: <= 2% (bf16);
- attention over an fp8 cache vs a bf16 cache: <= 10% (E4M3 K and V).
"""

from __future__ import annotations

import pytest
import torch

from sagellm_core.attention.reference import reference_paged_attention
from sagellm_core.quant.weights import quantize_fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _hopper() -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise FP8 GEMMs need SM 9.0+")


@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (7, 1024, 4096), (300, 14336, 4096), (64, 48, 32)])
def test_fp8_linear_against_dequantized_reference(m: int, n: int, k: int) -> None:
    _hopper()
    from sagellm_cuda.quant import make_fp8_linear, quantize_rows

    gen = torch.Generator().manual_seed(m + n + k)
    weight = (torch.randn(n, k, generator=gen) * 0.02).cuda()
    bias = (torch.randn(n, generator=gen) * 0.1).cuda()
    x = torch.randn(2, m, k, generator=gen).to(torch.bfloat16).cuda()
    qw = quantize_fp8(weight, bias)
    layer = make_fp8_linear(qw, torch.bfloat16)
    assert layer is not None
    out = layer(x)
    assert out.shape == (2, m, n) and out.dtype == torch.bfloat16
    from sagellm_cuda.quant import GEMV_MAX_ROWS

    if 2 * m <= GEMV_MAX_ROWS:  # the weight-only kernel keeps the activations as they are
        x_deq = x.reshape(-1, k).float()
    else:
        codes, scales = quantize_rows(x.reshape(-1, k))
        x_deq = codes.float() * scales
    exact = (x_deq @ qw.dequantize().t() + bias).view(2, m, n)
    assert _rel(out, exact) <= 0.01
    assert _rel(out, x.float() @ weight.t() + bias) <= 0.08


@pytest.mark.parametrize("m,n,k", [(1, 100, 300), (5, 4096, 14336), (16, 33, 1024)])
def test_fp8_gemv_against_dequantized_weights(m: int, n: int, k: int) -> None:
    from sagellm_cuda.fp8_gemv import fp8_gemv

    gen = torch.Generator().manual_seed(m * n + k)
    qw = quantize_fp8((torch.randn(n, k, generator=gen) * 0.02).cuda())
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = fp8_gemv(x, qw.codes, qw.scales.float().reshape(-1))
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert _rel(out, x.float() @ qw.dequantize().float().t()) <= 0.01


def test_fp8_linear_refuses_unaligned_shapes() -> None:
    _hopper()
    from sagellm_cuda.quant import make_fp8_linear

    assert make_fp8_linear(quantize_fp8(torch.randn(40, 24).cuda()), torch.bfloat16) is None


def test_fp8_linear_in_a_cuda_graph() -> None:
    _hopper()
    from sagellm_cuda.quant import make_fp8_linear

    layer = make_fp8_linear(quantize_fp8(torch.randn(256, 512).cuda() * 0.02), torch.bfloat16)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    eager = layer(x)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


CASES = [
    pytest.param([7, 100, 1500], [], 8, 8, 64, 16, id="decodes"),
    pytest.param([4095], [], 32, 8, 128, 16, id="decode-long-split"),
    pytest.param([], [(0, 77), (250, 64)], 16, 4, 128, 16, id="prefills"),
    pytest.param([15, 640], [(0, 33), (120, 200)], 16, 2, 64, 16, id="mixed"),
]


@pytest.mark.parametrize("widen", ["1", "0"], ids=["f16-dots", "bf16-dots"])
@pytest.mark.parametrize("decode_ctx,prefills,hq,hkv,d,block_size", CASES)
def test_triton_attention_over_fp8_cache(decode_ctx, prefills, hq, hkv, d, block_size, widen, monkeypatch) -> None:
    """Both ways of widening the fp8 codes (`widen_to_f16`) match the reference over the same cache."""
    from tests.gpu.test_triton_attention import _attention_module, _case

    monkeypatch.setenv("SAGELLM_FP8_ATTN_F16", widen)

    op = _attention_module().triton_paged_attention
    query, key, value, k_cache, v_cache, meta = _case(decode_ctx, prefills, hq, hkv, d, block_size, torch.bfloat16, 0)
    # saturation of out-of-range values is tested on the CPU path (tests/test_quant_kv.py); here the
    # cache starts in range (torch's own cast does not saturate: out-of-range values become NaN)
    k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    ref_k8, ref_v8 = k8.clone(), v8.clone()
    scale = d ** -0.5
    got = op(query, key, value, k8, v8, meta(), scale)
    ref = reference_paged_attention(query, key, value, ref_k8, ref_v8, meta(), scale)
    assert not torch.isnan(k8.float()).any() and not torch.isnan(got.float()).any()
    assert torch.equal(k8.view(torch.uint8), ref_k8.view(torch.uint8))  # the same bytes were written
    assert torch.equal(v8.view(torch.uint8), ref_v8.view(torch.uint8))
    assert _rel(got, ref) <= 0.02
    full = reference_paged_attention(query, key, value, k_cache.clone(), v_cache.clone(), meta(), scale)
    assert _rel(got, full) <= 0.10


def test_engine_with_fp8_weights_and_kv_cache(tiny_engine_dir) -> None:
    """FP8 weights and an fp8 KV cache on CUDA: half the KV bytes per block; greedy output follows
    bf16 on a tiny random model at least for one prompt's first token."""
    _hopper()
    from sagellm_core import SamplingParams
    from sagellm_core.config import EngineConfig
    from sagellm_core.engine import LLMEngine
    from tests.conftest import run_engine

    def engine(quantization: str, kv: str) -> LLMEngine:
        return LLMEngine(EngineConfig.from_dict({
            "model": {"path": str(tiny_engine_dir), "dtype": "bfloat16", "quantization": quantization},
            "backend": {"name": "cuda"}, "kv_cache": {"dtype": kv, "block_size": 16, "num_blocks": 64},
        }))

    fp8, bf16 = engine("fp8", "fp8"), engine("none", "auto")
    assert fp8.quantization.layers == {"fp8": 14}
    assert fp8.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    cache8, cache16 = fp8.runner.kv_caches[0], bf16.runner.kv_caches[0]
    assert cache8.numel() * cache8.element_size() * 2 == cache16.numel() * cache16.element_size()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]]
    out8 = [o.outputs[0].token_ids for o in run_engine(fp8, prompts, params)]
    out16 = [o.outputs[0].token_ids for o in run_engine(bf16, prompts, params)]
    assert all(len(o) == 8 for o in out8)
    assert sum(a[0] == b[0] for a, b in zip(out8, out16)) >= 1
