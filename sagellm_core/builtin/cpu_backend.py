"""The built-in CPU backend: always present, lowest priority, plain-torch paged attention
(`cpu_attention`; `attention_reference` is the oracle it is tested against), and the lean decoder
forward for Llama-style models (`sagellm_core.models.lean_decoder`)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import attrs

from sagellm_core.backend import Backend, BackendSpec, LeanForward, PagedAttentionOp, ProbeResult
from sagellm_core.hookspecs import RegisterBackend, hookimpl

if TYPE_CHECKING:
    import torch

    from sagellm_core.config import BackendConfig

log = logging.getLogger("sagellm")


@attrs.frozen
class CPUOptions:
    """``backend.options`` of the ``cpu`` backend."""

    lean_decoder: bool = True
    """Run Llama-style models (Llama, Mistral, Qwen2, Qwen3) through the lean decoder forward (same
    logits, less host time per step); false: always transformers' modules."""

    quantized_dense_rows: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    """Opt-in: int4 / int8 layers run a bf16 GEMM over a de-quantized (bf16) copy of their weight for
    steps of at least this many tokens, the packed kernels below (`sagellm_core.quant.cpu_linear`;
    16 measured best on a CPU with AVX-512 BF16: 1.33-1.37x the 64-prompt throughput of the default
    model). The copy costs 2 bytes per weight (4x an int4 weight) and rounds the weight once more
    (greedy outputs of long steps may change). 0 (default): packed kernels only, no copy."""


class CPUBackend(Backend):
    """The host CPU: float32, plain-torch paged attention, synchronous execution."""

    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"

    def __init__(self, config: BackendConfig | None = None, options: CPUOptions | None = None) -> None:
        super().__init__(config, options)
        self.settings = options if isinstance(options, CPUOptions) else CPUOptions()

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
        """Weight-only int8 / int4 through torch's packed CPU kernels (`sagellm_core.quant.cpu_linear`),
        a GEMM over the de-quantized weight (bf16 with bf16 instructions, else float32) from
        ``quantized_dense_rows`` tokens on; fp8 runs de-quantized."""
        from sagellm_core.quant.cpu_linear import cpu_quantized_linear

        return cpu_quantized_linear(kind, self.settings.quantized_dense_rows)

    def lean_forward(self, model: torch.nn.Module) -> LeanForward | None:
        """`sagellm_core.models.lean_decoder.LeanDecoder` for the models it covers (others, and
        ``lean_decoder: false``, keep transformers' forward)."""
        if not self.settings.lean_decoder:
            return None
        from sagellm_core.models.lean_decoder import LeanDecoder
        from sagellm_core.models.lean_support import lean_refusal

        reason = lean_refusal(model)
        if reason is not None:
            log.info("lean decoder off: %s", reason)
            return None
        return LeanDecoder(model)

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
    options=CPUOptions,
)


@hookimpl
def sagellm_register_backends(register: RegisterBackend) -> None:
    """Register the ``cpu`` backend."""
    register(SPEC)
