"""Quantized weights on the CPU: formats, the packed int8/int4 kernels, GGUF blocks, model patching,
the config/CLI settings and the backend hook."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sagellm_core.builtin.cpu_backend import CPUBackend
from sagellm_core.config import EngineConfig
from sagellm_core.errors import ConfigError
from sagellm_core.quant import QuantizedWeight, dequantized_linear, quantize, quantize_model, resolve_method
from sagellm_core.quant import cpu_linear
from sagellm_core.quant.cpu_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from sagellm_core.quant.weights import FP8_MAX


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), groups=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_round_trip_error_is_within_half_a_step(n: int, groups: int, seed: int) -> None:
    w = _weight(n, 32 * groups, seed)
    q8 = quantize("int8", w)
    assert q8.codes.dtype == torch.int8 and int(q8.codes.abs().max()) <= 127
    assert torch.all((q8.dequantize() - w).abs() <= q8.scales[:, None] / 2 + 1e-7)
    q4 = quantize("int4", w)
    assert q4.codes.dtype == torch.uint8 and int(q4.codes.max()) <= 15 and q4.scales.shape == (n, groups)
    step = q4.scales.repeat_interleave(32, dim=1)
    assert torch.all((q4.dequantize() - w).abs() <= step / 2 + 1e-6)
    q8f = quantize("fp8", w)
    assert q8f.codes.dtype == torch.float8_e4m3fn
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4, plus subnormal spacing near zero
    tol = w.abs() * 2.0**-4 + q8f.scales[:, None] * 2.0**-9
    assert torch.all((q8f.dequantize() - w).abs() <= tol + 1e-9)
    assert float(q8f.codes.float().abs().max()) <= FP8_MAX


def test_unknown_kind_and_bad_group_are_refused() -> None:
    with pytest.raises(ValueError, match="quantization"):
        quantize("int3", _weight(4, 32))
    with pytest.raises(ValueError, match="group_size"):
        quantize("int4", _weight(4, 40))


@pytest.mark.parametrize("kind,module", [("int8", Int8WeightOnlyLinear), ("int4", Int4WeightOnlyLinear)])
@pytest.mark.parametrize("rows", [1, 5, 9])  # 2 x 9 rows: the bf16 GEMM over the de-quantized weight
def test_packed_cpu_linear_matches_dequantized_weights(kind: str, module: type, rows: int) -> None:
    w = _weight(96, 128, seed=1)
    bias = torch.randn(96) * 0.1
    qw = quantize(kind, w, bias)
    layer = module(qw)
    x = torch.randn(2, rows, 128, generator=torch.Generator().manual_seed(2))
    ref = dequantized_linear(qw, torch.float32, torch.device("cpu"))(x)
    out = layer(x)
    assert out.shape == (2, rows, 96) and out.dtype == torch.float32
    # the kernels take bf16 activations (8-bit mantissa): |error| <= 2% of the output scale
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())


@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,module", [("int8", Int8WeightOnlyLinear), ("int4", Int4WeightOnlyLinear)])
def test_many_rows_run_a_gemm_over_the_kernels_weight(kind: str, module: type, copy_dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """From ``dense_min_rows`` rows on: F.linear over the kernel's weight in the copy's dtype (bf16 on
    CPUs with bf16 instructions, float32 elsewhere), close to the kernel; ``dense_min_rows=0`` keeps
    no copy and always runs the kernel."""
    monkeypatch.setattr(cpu_linear, "dense_dtype", lambda: copy_dtype)
    qw = quantize(kind, _weight(96, 128, seed=4))
    layer, packed_only = module(qw, dense_min_rows=16), module(qw, dense_min_rows=0)
    assert packed_only.dense is None and layer.dense.dtype == copy_dtype
    assert layer.weight_bytes() == packed_only.weight_bytes()  # the copy is not what a decode step reads
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    dense = layer(x)
    rows = x.to(torch.bfloat16).to(copy_dtype)  # the layer's bf16 activations
    assert torch.equal(dense, F.linear(rows, layer.dense).to(torch.bfloat16).float())
    assert torch.equal(layer(x[:15]), packed_only(x[:15]))  # below the threshold: the packed kernel
    kernel = packed_only(x)
    assert float((dense - kernel).abs().max()) <= 0.01 * float(kernel.abs().max())


def test_the_copies_are_bf16_only_with_bf16_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_linear.dense_dtype() == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cpu_linear.dense_dtype() == torch.bfloat16


def test_the_cpu_backend_option_sets_the_dense_threshold() -> None:
    from sagellm_core.builtin.cpu_backend import CPUOptions

    qw = quantize("int4", _weight(96, 128, seed=6))
    on = CPUBackend(None, CPUOptions(quantized_dense_rows=16)).quantized_linear("int4")
    assert on(qw, torch.float32).dense_min_rows == 16
    off = CPUBackend().quantized_linear("int8")  # the default: packed kernels only, no copy
    assert off(quantize("int8", _weight(96, 128, seed=6)), torch.float32).dense is None
    with pytest.raises(ValueError):
        CPUOptions(quantized_dense_rows=-1)


def test_int4_codes_follow_the_kernel_convention() -> None:
    """A weight whose groups are exactly representable comes back exactly (up to bf16 scales)."""
    codes = torch.randint(0, 16, (64, 64), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    scales = torch.full((64, 2), 0.25)
    offsets = torch.full((64, 2), -2.0)
    qw = QuantizedWeight("int4", codes, scales, offsets, 32)
    eye = torch.eye(64)
    assert torch.equal(Int4WeightOnlyLinear(qw)(eye).t(), qw.dequantize())


# ---- method resolution and patching -----------------------------------------------------------
def test_resolve_method(tmp_path: Path) -> None:
    from sagellm_core.models.loader import default_gguf_path

    gguf = default_gguf_path()
    assert resolve_method("auto", "auto", "cpu", gguf) == "gguf"
    assert resolve_method("auto", "float32", "cpu", gguf) == "none"  # --dtype float32 keeps today's path
    assert resolve_method("auto", "auto", "cuda", gguf) == "none"
    assert resolve_method("auto", "auto", "cpu", None) == "none"
    assert resolve_method("auto", "auto", "cpu", gguf, "dummy") == "none"
    assert resolve_method("int8", "float32", "cuda", None) == "int8"


def _tiny_llama(seed: int = 0) -> Any:
    import transformers

    from tests.conftest import tiny_config

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config("llama")).eval()


@pytest.mark.parametrize("method,expected", [
    ("int8", {"int8": 15}),
    ("int4", {"int4": 14, "int8": 1}),     # int4 keeps the LM head at int8
    ("fp8", {"fp8 (de-quantized)": 14}),   # no FP8 GEMM on the CPU; the LM head stays unquantized for fp8
])
def test_quantize_model_swaps_linears(method: str, expected: dict[str, int]) -> None:
    model, twin = _tiny_llama(), _tiny_llama()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        report = quantize_model(model, method, CPUBackend(), torch.float32)
        out = model(ids).logits
        quantize_model(twin, method, _NoGemmBackend(), torch.float32)
        dequantized = twin(ids).logits
    assert report.layers == expected
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Int8WeightOnlyLinear" in kinds) == (method in ("int8", "int4"))
    assert ("Int4WeightOnlyLinear" in kinds) == (method == "int4")
    # the kernels compute what the de-quantized weights compute, up to bf16 activations
    assert float((out - dequantized).abs().max()) <= 0.03 * float(dequantized.abs().max())
    # and 4-bit weights of a tiny random model stay within a fifth of the logits' spread
    assert float((out - ref).abs().max()) <= 0.2 * float(ref.abs().max())


class _NoGemmBackend(CPUBackend):
    def quantized_linear(self, kind: str) -> None:
        return None


def test_quantize_none_is_a_no_op() -> None:
    model = _tiny_llama()
    before = [id(m) for m in model.modules()]
    assert quantize_model(model, "none", CPUBackend(), torch.float32).summary() == "none"
    assert [id(m) for m in model.modules()] == before


def test_backend_without_a_gemm_gets_dequantized_weights() -> None:
    class NoGemmBackend(CPUBackend):
        def quantized_linear(self, kind: str) -> None:
            return None

    model = _tiny_llama()
    report = quantize_model(model, "int8", NoGemmBackend(), torch.float32)
    assert report.layers == {"int8 (de-quantized)": 15}
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))


# ---- settings ------------------------------------------------------------------------------------
def test_config_fields_and_errors() -> None:
    config = EngineConfig.from_dict({"model": {"quantization": "int4"}, "kv_cache": {"dtype": "fp8"}})
    assert config.model.quantization == "int4" and config.kv_cache.dtype == "fp8"
    assert EngineConfig().model.quantization == "auto" and EngineConfig().kv_cache.dtype == "auto"
    with pytest.raises(ConfigError, match="model.quantization: must be one of"):
        EngineConfig.from_dict({"model": {"quantization": "int3"}})
    with pytest.raises(ConfigError, match="kv_cache.dtype: must be one of"):
        EngineConfig.from_dict({"kv_cache": {"dtype": "int8"}})


def test_cli_flags() -> None:
    from sagellm_core.cli.common import add_engine_options, engine_config

    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    config = engine_config(parser.parse_args(["--quantization", "int8", "--kv-cache-dtype", "fp8"]))
    assert config.model.quantization == "int8" and config.kv_cache.dtype == "fp8"
    assert engine_config(parser.parse_args([])).model.quantization == "auto"


def test_quantized_modules_report_their_shape_through_weight() -> None:
    """Code that inspects ``lm_head.weight`` (benchmark floors) still works on a quantized model."""
    floors = pytest.importorskip("sagellm_bench.floors")
    param_counts = floors.param_counts

    model = _tiny_llama()
    quantize_model(model, "int4", CPUBackend(), torch.float32)
    head = model.get_output_embeddings()
    assert head.weight.shape == (256, 64) and head.weight.device.type == "meta"
    assert param_counts(model).lm_head == 256 * 64


def test_the_weight_read_floor_counts_the_stored_bytes_of_quantized_layers() -> None:
    floors = pytest.importorskip("sagellm_bench.floors")

    model = _tiny_llama()
    dense = floors.param_counts(model)
    quantize_model(model, "int4", CPUBackend(), torch.float32)
    quantized = floors.param_counts(model)
    assert (quantized.total, quantized.body, quantized.lm_head) == (dense.total, dense.body, dense.lm_head)
    layers = [m for m in model.modules() if hasattr(m, "weight_bytes")]
    others = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embed_tokens" not in name)
    row = model.get_input_embeddings().weight[0]
    assert quantized.decode_bytes == sum(m.weight_bytes() for m in layers) + others + row.numel() * row.element_size()
    assert quantized.decode_bytes < dense.decode_bytes / 3  # int4 codes, an int8 head, scales: not fp32
