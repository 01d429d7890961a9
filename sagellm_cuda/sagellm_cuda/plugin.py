"""The ``cuda`` backend plugin: NVIDIA GPUs through a CUDA build of torch, Triton paged attention.

Priority 100, the highest of the first-party backends. It never claims a ROCm/HIP build of torch
(``torch.version.hip`` set): AMD GPUs and Hygon DCUs also answer to ``torch.cuda``, and Hygon DCUs
belong to the ``hygon`` backend.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any, Callable

from sagellm_core.accelerator import TorchNamespaceBackend, backend_spec, module_available
from sagellm_core.backend import PagedAttentionOp, ProbeResult
from sagellm_core.hookspecs import hookimpl

SAGELLM_PLUGIN_API = ">=1.0,<2"

NAME = "cuda"
PRIORITY = 100
DEVICE_TYPE = "cuda"
DIST_BACKEND = "nccl"
VISIBLE_DEVICES_ENV = "CUDA_VISIBLE_DEVICES"

logger = logging.getLogger(__name__)


def _import_torch() -> ModuleType:
    import torch

    return torch


# ---- probing (pure functions over the torch module, so tests can pass fakes) ----------------------
def probe_cuda(torch: Any) -> ProbeResult:
    """Answer from a torch module: NVIDIA CUDA build (no HIP) with at least one visible device.

    Uses only ``torch.version`` and ``torch.cuda.is_available()`` / ``device_count()``, which count
    devices without creating a CUDA context or allocating memory.
    """
    hip = getattr(torch.version, "hip", None)
    if hip:
        return ProbeResult(False, f"torch is a ROCm/HIP build (hip {hip}), not NVIDIA CUDA")
    cuda_version = getattr(torch.version, "cuda", None)
    if not torch.cuda.is_available():
        if cuda_version is None:
            return ProbeResult(False, f"torch {torch.__version__} has no CUDA support")
        return ProbeResult(False, f"torch CUDA {cuda_version}: no CUDA device visible")
    count = int(torch.cuda.device_count())
    return ProbeResult(True, f"{count} x CUDA device (CUDA {cuda_version})", device_count=count)


def probe() -> ProbeResult:
    """Side-effect-free presence check of NVIDIA GPUs (no context, no allocation)."""
    return probe_cuda(_import_torch())


# ---- attention op ---------------------------------------------------------------------------------
def load_triton_attention() -> tuple[PagedAttentionOp | None, str]:
    """The Triton paged-attention op and a note, or ``(None, why not)`` when Triton cannot be used."""
    if not module_available("triton"):
        return None, "triton not installed"
    try:
        importlib.import_module("triton")
        from sagellm_cuda.attention import triton_paged_attention
    except Exception as exc:  # a broken Triton install must degrade to the reference op, loudly
        logger.warning("sagellm-cuda: Triton attention unavailable (%s: %s); using the reference op",
                       type(exc).__name__, exc)
        return None, f"Triton attention failed to import: {type(exc).__name__}: {exc}"
    return triton_paged_attention, "triton"


def load_optional_kernel(switch: str, module: str, name: str, what: str) -> Any:
    """``module.name``, or None when ``<switch>=0`` is set in the environment (A/B measurements) or
    Triton is missing or broken (logged: the backend then keeps the plain-torch path)."""
    if os.environ.get(switch, "1") == "0" or not module_available("triton"):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:  # a broken Triton install must degrade to the plain path, loudly
        logger.warning("sagellm-cuda: %s unavailable (%s: %s)", what, type(exc).__name__, exc)
        return None


class CUDABackend(TorchNamespaceBackend):
    """A selected NVIDIA GPU: ``cuda:<device_index>``, NCCL, Triton paged attention."""

    name = NAME
    device_type = DEVICE_TYPE
    dist_backend = DIST_BACKEND
    visible_devices_env = VISIBLE_DEVICES_ENV

    async_output = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.attention_impl = "not built yet"

    def start_host_copy(self, tensor: Any) -> Callable[[], list[Any]]:
        """Copy into pinned host memory behind the queued work; an event marks when it has landed."""
        torch = _import_torch()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensor.device))

        def read() -> list[Any]:
            done.synchronize()
            return host.tolist()

        return read

    def attention_op(self) -> PagedAttentionOp:
        """Triton paged attention when Triton imports, else the plain-torch reference op."""
        op, note = load_triton_attention()
        if op is None:
            self.attention_impl = f"reference ({note})"
            return super().attention_op()
        self.attention_impl = note
        return op

    def prepare_model(self, model: Any, dtype: Any) -> None:
        """Fused Triton kernels for the RMSNorm / rotary / SiLU*up / residual glue of bf16 and fp16
        Llama-family models (`sagellm_cuda.fused.patch_model`); fp32 models stay untouched.

        ``SAGELLM_FUSED=0`` in the environment turns it off (A/B measurements). The patched module
        names are kept in ``self.fused_modules``.
        """
        self.fused_modules: list[str] = []
        patch_model = load_optional_kernel("SAGELLM_FUSED", "sagellm_cuda.fused", "patch_model", "fused kernels")
        if patch_model is None:
            return
        self.fused_modules = patch_model(model, dtype)
        if self.fused_modules:
            kinds: dict[str, int] = {}
            for entry in self.fused_modules:
                kind = entry.rsplit(": ", 1)[-1]
                kinds[kind] = kinds.get(kind, 0) + 1
            logger.info("sagellm-cuda: fused kernels in %s", ", ".join(f"{n} {k}" for k, n in kinds.items()))

    def quantized_linear(self, kind: str) -> Any:
        """FP8 (E4M3 weights and per-token activations) through ``torch._scaled_mm`` on SM 9.0+
        (`sagellm_cuda.quant`); int8 / int4 weights run de-quantized in the model dtype."""
        if kind != "fp8":
            return None
        from sagellm_cuda.quant import make_fp8_linear

        return make_fp8_linear

    def fused_sampler(self) -> Any:
        """`sagellm_cuda.sampling.gumbel_argmax` (one Triton pass per row) unless Triton is missing or
        ``SAGELLM_FUSED_SAMPLING=0``."""
        return load_optional_kernel("SAGELLM_FUSED_SAMPLING", "sagellm_cuda.sampling", "gumbel_argmax",
                                    "fused sampler")

    def fused_filtered_sampler(self) -> Any:
        """`sagellm_cuda.filtered_sampling.sample_filtered` (top-k rows drawn from their candidates,
        the others by rejection sampling: no sort, no masked copy) unless Triton is missing or
        ``SAGELLM_FUSED_SAMPLING=0``."""
        return load_optional_kernel("SAGELLM_FUSED_SAMPLING", "sagellm_cuda.filtered_sampling", "sample_filtered",
                                    "fused filtered sampler")

    def fused_logprobs(self) -> Any:
        """`sagellm_cuda.logprobs.fused_logprobs` (log-sum-exp and top-n in one Triton pass per row)
        unless Triton is missing or ``SAGELLM_FUSED_LOGPROBS=0``."""
        return load_optional_kernel("SAGELLM_FUSED_LOGPROBS", "sagellm_cuda.logprobs", "fused_logprobs",
                                    "fused logprobs")

    def bitmask_op(self) -> Any:
        """`sagellm_cuda.bitmask.apply_token_bitmask` (structured outputs' mask in one Triton pass)
        unless Triton is missing or ``SAGELLM_FUSED_BITMASK=0``."""
        return load_optional_kernel("SAGELLM_FUSED_BITMASK", "sagellm_cuda.bitmask", "apply_token_bitmask",
                                    "fused token bitmask")

    def graph_capture(self) -> Any:
        """CUDA-graph capture for decode steps (`sagellm_cuda.graphs.CUDAGraphCapture`), or None.

        NOTE: only with the Triton op, which reads lengths and block tables from device buffers on every
        replay; the reference op syncs to the host to plan (``int(tensor)``), which capture forbids.
        """
        op, _ = load_triton_attention()
        if op is None:
            return None
        from sagellm_cuda.graphs import CUDAGraphCapture

        return CUDAGraphCapture(self.device())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "attention": self.attention_impl}


SPEC = backend_spec(CUDABackend, PRIORITY, probe, "NVIDIA GPUs via CUDA torch; Triton paged attention")


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``cuda`` backend."""
    register(SPEC)
