"""The built-in CPU backend: always present, lowest priority, plain-torch paged attention
(`cpu_attention`; `attention_reference` is the oracle it is tested against)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from sagellm_core.backend import Backend, BackendSpec, PagedAttentionOp, ProbeResult
from sagellm_core.hookspecs import RegisterBackend, hookimpl


class CPUBackend(Backend):
    """The host CPU: float32, plain-torch paged attention, synchronous execution."""

    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def device(self) -> torch.device:
        import torch

        return torch.device("cpu")

    def default_dtype(self) -> torch.dtype:
        """float32: the CPU kernels torch ships are fastest and exact there."""
        import torch

        return torch.float32

    def synchronize(self) -> None:
        """Nothing is queued: CPU ops run when called."""

    def memory_info(self) -> tuple[int, int]:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def attention_op(self) -> PagedAttentionOp:
        """`cpu_attention.CPUPagedAttention` (one per model runner: it owns scratch buffers); the
        reference op stays the oracle that tests compare it with."""
        from sagellm_core.attention.cpu import CPUPagedAttention

        return CPUPagedAttention()

    def quantized_linear(self, kind: str) -> Any:
        """Weight-only int8 / int4 through torch's packed CPU kernels (`sagellm_core.quant.cpu_linear`);
        fp8 runs de-quantized."""
        from sagellm_core.quant.cpu_linear import cpu_quantized_linear

        return cpu_quantized_linear(kind)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "attention": "cpu_attention"}


def probe() -> ProbeResult:
    """The CPU is always there."""
    return ProbeResult(True, f"{os.cpu_count()} CPU cores", device_count=1)


SPEC = BackendSpec(
    name="cpu",
    priority=0,
    probe=probe,
    create=CPUBackend,
    device_type="cpu",
    dist_backend="gloo",
    description="plain torch on the host CPU",
)


@hookimpl
def sagellm_register_backends(register: RegisterBackend) -> None:
    """Register the ``cpu`` backend."""
    register(SPEC)
