"""The quantized-GEMM hook of the backend plugins: CPU int8/int4 kernels, CUDA FP8, and the vendor
plugins (simulated vendor modules) that name what they would use and fall back to de-quantized
weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sagellm_cuda.plugin as cuda
import sagellm_hygon.plugin as hygon
from sagellm_core.builtin.cpu_backend import CPUBackend
from sagellm_core.config import BackendConfig
from sagellm_core.quant import KINDS, quantize_model
from tests.test_vendor_backends import VENDOR_CASES, simulate_vendor


def test_cpu_backend_offers_int8_and_int4_only() -> None:
    backend = CPUBackend()
    assert backend.quantized_linear("int8") is not None and backend.quantized_linear("int4") is not None
    assert backend.quantized_linear("fp8") is None


def test_cuda_backend_offers_fp8_only() -> None:
    from sagellm_cuda.quant import make_fp8_linear

    backend = cuda.CUDABackend.__new__(cuda.CUDABackend)  # no device needed to ask
    assert backend.quantized_linear("fp8") is make_fp8_linear
    assert backend.quantized_linear("int8") is None and backend.quantized_linear("int4") is None


def test_fp8_factory_declines_without_a_hopper_gpu() -> None:
    from sagellm_core.quant.weights import quantize_fp8
    from sagellm_cuda.quant import make_fp8_linear

    assert make_fp8_linear(quantize_fp8(torch.randn(32, 32)), torch.bfloat16) is None  # CPU tensor


def _tiny_llama() -> Any:
    import transformers

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config("llama")).eval()


@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_backends_fall_back_to_dequantized_weights(monkeypatch: pytest.MonkeyPatch, case: Any) -> None:
    model = _tiny_llama()  # before the fake vendor module is importable (transformers probes for it)
    simulate_vendor(monkeypatch, case, 1)
    backend = case.plugin.SPEC.create(BackendConfig())
    cls = type(backend)
    assert set(cls.QUANTIZED_GEMMS) == set(KINDS) and all(cls.QUANTIZED_GEMMS.values())
    assert all(backend.quantized_linear(kind) is None for kind in KINDS)
    assert "QUANTIZED_GEMMS" in (cls.quantized_linear.__doc__ or "")
    monkeypatch.setattr(backend, "device", lambda: torch.device("cpu"))  # run the fallback on the host
    report = quantize_model(model, "int4", backend, torch.float32)
    assert report.layers == {"int4 (de-quantized)": 14, "int8 (de-quantized)": 1}
    assert all(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n.endswith("_proj"))


def test_hygon_names_its_gemms() -> None:
    cls = hygon.HygonBackend
    assert set(cls.QUANTIZED_GEMMS) == set(KINDS)
    assert all(cls.quantized_linear(cls.__new__(cls), kind) is None for kind in KINDS)
