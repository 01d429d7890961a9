"""Backend plugin contract: device probing, device wiring, KV storage and the paged-attention op."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Protocol

import attrs

if TYPE_CHECKING:
    import torch

    from sagellm_core.attention.metadata import AttentionMetadata
    from sagellm_core.quant.weights import LinearFactory


@attrs.frozen
class ProbeResult:
    """Answer to "is my device here?": computed without initialising the device."""

    available: bool
    detail: str
    device_count: int = 0


@attrs.frozen
class BackendSpec:
    """What a backend plugin registers.

    ``probe`` must be free of side effects (no device initialisation, no memory allocation);
    ``create(backend_config)`` builds the `Backend` once the backend has been selected.
    """

    name: str
    priority: int
    probe: Callable[[], ProbeResult]
    create: Callable[[Any], "Backend"]
    device_type: str
    dist_backend: str
    visible_devices_env: str | None = None
    description: str = ""


class PagedAttentionOp(Protocol):
    """Writes the new tokens' K/V into the paged cache, then attends over each sequence's context.

    Shapes: ``query`` [T, Hq, D], ``key``/``value`` [T, Hkv, D] for the T new tokens of the step
    (all sequences flattened); ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D]. Returns
    [T, Hq, D]. ``sliding_window`` (if set) limits each query to that many most recent keys.
    """

    def __call__(
        self,
        query: "torch.Tensor",
        key: "torch.Tensor",
        value: "torch.Tensor",
        k_cache: "torch.Tensor",
        v_cache: "torch.Tensor",
        meta: "AttentionMetadata",
        scale: float,
        sliding_window: int | None = None,
    ) -> "torch.Tensor": ...


class Backend:
    """A selected, initialised device platform. Subclasses override what differs from the CPU."""

    name = "base"
    device_type = "cpu"
    dist_backend = "gloo"
    visible_devices_env: str | None = None
    async_output = False
    """True when `start_host_copy` returns before the copy is done, so the engine can queue the next
    step before it reads this one's tokens (``scheduler.async_scheduling: auto`` turns on then)."""

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def device(self) -> "torch.device":
        import torch

        index = getattr(self.config, "device_index", 0) if self.device_type != "cpu" else None
        return torch.device(self.device_type, index) if index is not None else torch.device(self.device_type)

    def default_dtype(self) -> "torch.dtype":
        import torch

        return torch.float32

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory usable for weights and KV cache."""
        raise NotImplementedError(f"backend {self.name!r} does not report memory")

    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: "torch.dtype",
    ) -> "torch.Tensor":
        """One tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] on the device."""
        import torch

        return torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=self.device()
        )

    def attention_op(self) -> PagedAttentionOp:
        from sagellm_core.attention.reference import reference_paged_attention

        return reference_paged_attention

    def prepare_model(self, model: Any, dtype: "torch.dtype") -> None:
        """Optionally swap modules of a loaded model for device-specific fused versions (default: none).

        Must keep the model's function: greedy outputs stay those of the unmodified model.
        """

    def quantized_linear(self, kind: str) -> "LinearFactory | None":
        """The module factory for linear layers with weights in format ``kind`` (``int8``, ``int4``,
        ``fp8``; see `sagellm_core.quant.weights`), or None when this device has no GEMM for it: those
        layers then run with the de-quantized weights in the model dtype. A factory may also return
        None for a single weight whose shape its kernel does not take. Default: none."""
        return None

    def fused_sampler(self) -> Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"] | None:
        """Optionally, a one-pass sampler used when no request of the batch filters (top-k/p, min-p):
        ``(logits [N, V] float32, inverse temperatures [N] float32 (0 = greedy), keys [N] int64)``
        -> token ids [N] int64, drawn from softmax(logits * inverse temperature) with a random
        stream fixed by each row's key (same key, same logits: same token). Default: none (the
        generic torch sampler runs)."""
        return None

    def graph_capture(self) -> Any:
        """A `sagellm_core.models.graphs.GraphCapture` if this device can replay captured graphs, else None."""
        return None

    def synchronize(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def start_host_copy(self, tensor: "torch.Tensor") -> Callable[[], list[Any]]:
        """Start copying a small device tensor to the host; the returned function waits for that
        copy only (not for work queued after it) and returns the values as a list.

        Default: copy when called, which on an asynchronous device also waits for later work.
        """
        return tensor.tolist

    def visible_devices(self) -> str | None:
        return os.environ.get(self.visible_devices_env) if self.visible_devices_env else None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": str(self.device()),
            "dist_backend": self.dist_backend,
            "visible_devices_env": self.visible_devices_env,
            "visible_devices": self.visible_devices(),
        }
