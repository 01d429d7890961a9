"""Backend plugin contract: device probing, device wiring, KV storage and the paged-attention op."""

from __future__ import annotations

import abc
import os
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import attrs

if TYPE_CHECKING:
    import torch

    from sagellm_core.attention.metadata import AttentionMetadata
    from sagellm_core.config import BackendConfig
    from sagellm_core.quant.weights import LinearFactory
    from sagellm_core.sampling.draw import FilteredSampler, FusedSampler
    from sagellm_core.sampling.logprobs import FusedLogprobs


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
    ``create(backend_config)`` builds the `Backend` once the backend has been selected, or
    ``create(backend_config, options)`` when ``options`` names an attrs class: the user's
    ``backend.options`` mapping is validated against it (errors name ``backend.options.<field>``).
    """

    name: str
    priority: int
    probe: Callable[[], ProbeResult]
    create: Callable[..., "Backend"]
    device_type: str
    dist_backend: str
    visible_devices_env: str | None = None
    description: str = ""
    options: type | None = None


class PagedAttentionOp(Protocol):
    """Writes the new tokens' K/V into the paged cache, then attends over each sequence's context.

    Shapes: ``query`` [T, Hq, D], ``key``/``value`` [T, Hkv, D] for the T new tokens of the step
    (all sequences flattened); ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D]. Returns
    [T, Hq, D]. ``sliding_window`` (if set) limits each query to that many most recent keys.

    An op may also implement the score modifiers some models need, passed as keywords only when a
    layer asks for them: ``sinks`` [Hq] (attention sinks) and ``softcap`` (logit soft-capping). It
    declares what it implements in ``supported_features`` (names in `sagellm_core.attention.features`;
    an op without the attribute is taken to implement the sliding window only), and the loader
    refuses models that need more.
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


class Backend(abc.ABC):
    """The contract of a selected, initialised device platform.

    A subclass sets the class attributes ``name``, ``device_type`` and ``dist_backend`` (checked when
    it is instantiated) and implements the abstract methods: where tensors live (`device`), the
    dtype ``model.dtype: auto`` means (`default_dtype`), how much memory there is (`memory_info`),
    the paged-attention op (`attention_op`) and how to wait for queued work (`synchronize`).
    Everything else has a documented default that is right for any device: KV storage through
    ``torch.zeros`` on `device`, no model rewriting, no fused sampler or logprobs, no graph capture, a blocking
    host copy. `sagellm_core.builtin.cpu_backend.CPUBackend` is the built-in host backend;
    `sagellm_core.accelerator.TorchNamespaceBackend` implements the contract for devices whose torch
    extension mirrors ``torch.cuda``.
    """

    name: ClassVar[str]
    device_type: ClassVar[str]
    """torch device type (``"cpu"``, ``"cuda"``, ``"npu"``, ...)."""
    dist_backend: ClassVar[str]
    """torch.distributed backend name (``"gloo"``, ``"nccl"``, ``"hccl"``, ...)."""
    visible_devices_env: ClassVar[str | None] = None
    """Environment variable that restricts visible devices (``CUDA_VISIBLE_DEVICES``), if any."""
    async_output: ClassVar[bool] = False
    """True when `start_host_copy` returns before the copy is done, so the engine can queue the next
    step before it reads this one's tokens (``scheduler.async_scheduling: auto`` turns on then)."""

    REQUIRED_ATTRIBUTES: ClassVar[tuple[str, ...]] = ("name", "device_type", "dist_backend")

    def __init__(self, config: BackendConfig | None = None, options: Any = None) -> None:
        """``config``: the ``backend`` config section; ``options``: the instance of the options class
        the backend registered in its `BackendSpec` (``{}`` when it registered none)."""
        missing = [a for a in self.REQUIRED_ATTRIBUTES if not isinstance(getattr(type(self), a, None), str)]
        if missing:
            raise TypeError(f"backend class {type(self).__name__} must set {', '.join(missing)} (class attributes)")
        self.config = config
        self.options = options if options is not None else {}

    @property
    def device_index(self) -> int:
        """``backend.device_index`` from the config (0 without a config)."""
        return self.config.device_index if self.config is not None else 0

    # ---- what every backend decides --------------------------------------------------------------
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The torch device that holds the weights, the KV cache and the step's inputs."""

    @abc.abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The weight and KV dtype that ``model.dtype: auto`` resolves to on this device."""

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory usable for weights and KV cache."""

    @abc.abstractmethod
    def attention_op(self) -> PagedAttentionOp:
        """The paged-attention op (one per model runner: an op may own scratch buffers).

        `sagellm_core.attention.reference.reference_paged_attention` is a correct plain-torch op
        for any device (slow; syncs to the host to plan).
        """

    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait until the device has finished all queued work (a no-op on a synchronous device)."""

    # ---- generic defaults ------------------------------------------------------------------------
    def allocate_kv_cache(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """One tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] on `device`.

        Default: ``torch.zeros`` there. Override for device-specific layouts or allocators.
        """
        import torch

        return torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=self.device()
        )

    def attention_features(self) -> frozenset[str]:
        """The optional attention features (`sagellm_core.attention.features`) of `attention_op`'s op:
        the loader refuses models whose layers need others."""
        from sagellm_core.attention.features import op_features

        return op_features(self.attention_op())

    def prepare_model(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Optionally swap modules of a loaded model for device-specific fused versions (default: none).

        Must keep the model's function: greedy outputs stay those of the unmodified model.
        """

    def lean_forward(self, model: torch.nn.Module) -> LeanForward | None:
        """Optionally, a forward pass that replaces the model's own for the runner's steps: called as
        ``(ids, positions, meta, kv_pool, keep, attention_op)``, it returns the float32 logits of the
        rows ``keep``, equal to those of the model's forward with sageLLM's attention function.
        Called once, after `prepare_model` (default: None, the model's own forward)."""
        return None

    def quantized_linear(self, kind: str) -> "LinearFactory | None":
        """The module factory for linear layers with weights in format ``kind`` (``int8``, ``int4``,
        ``fp8``; see `sagellm_core.quant.weights`), or None when this device has no GEMM for it: those
        layers then run with the de-quantized weights in the model dtype. A factory may also return
        None for a single weight whose shape its kernel does not take. Default: none."""
        return None

    def fused_sampler(self) -> FusedSampler | None:
        """Optionally, a one-pass sampler used when no request of the batch filters (top-k/p, min-p):
        ``(logits [N, V] float32, inverse temperatures [N] float32 (0 = greedy), keys [N] int64)``
        -> token ids [N] int64, drawn from softmax(logits * inverse temperature) with a random
        stream fixed by each row's key (same key, same logits: same token). Default: none (the
        generic torch sampler runs)."""
        return None

    def fused_filtered_sampler(self) -> FilteredSampler | None:
        """Optionally, a sampler for batches where some rows filter (top-k, top-p, min-p) that needs
        neither a sort nor a masked copy of the logits: ``(logits, inverse temperatures, keys)`` as
        `fused_sampler`, then ``top_k`` (a host list of int, one per row: keeps the tokens at or above
        the row's k-th largest logit, ties kept; 0 or >= V: off), ``top_p`` [N] float32 (1.0: off) and
        ``log_min_p`` [N] float32 (-inf: off) -> token ids [N] int64 from the filtered distribution
        (filters in vLLM's order: top-k, top-p, min-p), queued without waiting for the device.
        Default: none (`sagellm_core.sampling.filters` masks the logits, then the draw)."""
        return None

    def fused_logprobs(self) -> FusedLogprobs | None:
        """Optionally, logprobs in one pass over the logits: ``(logits [M, V] float32, n)`` ->
        (log-sum-exp [M, 1] float32, the top ``n`` logprobs [M, n] float32 best first, their token ids
        [M, n] int64), queued without waiting for the device, or None for an input it does not take
        (then, and by default, torch's ``logsumexp`` and ``topk`` run: `sagellm_core.sampling.logprobs`).
        ``n`` may be 0 (only the chosen token's logprob is wanted). Equal values may come in any order."""
        return None

    def bitmask_op(self) -> BitmaskOp | None:
        """Optionally, structured outputs' fused token mask: ``(logits [N, V] float32, words [N, W]
        int32)``, both on this device (bit i of word w allows token 32 * w + i; ids >= 32 * W are not
        allowed) -> a new [N, V] tensor with the disallowed logits at -inf. Default: none (torch's
        unpack and ``where``, `sagellm_core.structured.bitmask.mask_logits`)."""
        return None

    def graph_capture(self) -> Any:
        """A `sagellm_core.models.graphs.GraphCapture` if this device can replay captured graphs.

        Default: None (every step runs eagerly)."""
        return None

    def start_host_copy(self, tensor: torch.Tensor) -> Callable[[], list[Any]]:
        """Start copying a small device tensor to the host; the returned function waits for that
        copy only (not for work queued after it) and returns the values as a list.

        Default: copy when called, which on an asynchronous device also waits for later work
        (correct everywhere; set ``async_output`` only with a real asynchronous copy).
        """
        return tensor.tolist

    def visible_devices(self) -> str | None:
        """The value of ``visible_devices_env`` in this process, if the backend has one."""
        return os.environ.get(self.visible_devices_env) if self.visible_devices_env else None

    def describe(self) -> dict[str, Any]:
        """What `sagellm plugins`, benchmarks and logs show about this backend (extend, don't replace)."""
        return {
            "name": self.name,
            "device": str(self.device()),
            "dist_backend": self.dist_backend,
            "visible_devices_env": self.visible_devices_env,
            "visible_devices": self.visible_devices(),
        }


BitmaskOp = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
LeanForward = Callable[..., "torch.Tensor"]
