"""Model runner: owns the KV cache tensors and all device work of a step (inputs, forward, block
copies, decode graphs). It reads only the plain `StepPlan`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sagellm_core.attention import hook as attention_hook
from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.backend import Backend
from sagellm_core.models.graphs import DecodeGraphRunner
from sagellm_core.models.inputs import HostBatch, build_host_batch, device_batch
from sagellm_core.models.kv_cache import KVCache, kv_bytes_per_block, kv_shape, text_config
from sagellm_core.models.token_feed import TokenFeed, feed_pending
from sagellm_core.plan import StepPlan

__all__ = ["ModelRunner", "kv_bytes_per_block", "kv_shape", "text_config"]


class ModelRunner:
    """Turns a `StepPlan` into one flattened forward pass and returns the logits to sample."""

    def __init__(self, model: Any, backend: Backend, block_size: int, pool_blocks: list[int],
                 kv_dtype: torch.dtype, max_model_len: int = 0, graph_batch_size: int = 0,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.device = backend.device()
        self.block_size = block_size
        self.kv_cache = KVCache(backend, model, pool_blocks, block_size, cache_dtype or kv_dtype)
        self.op = backend.attention_op()
        backend.prepare_model(model, kv_dtype)
        model.config._attn_implementation = attention_hook.register()
        for sub in model.modules():  # sub-configs of composite models
            sub_config = getattr(sub, "config", None)
            if sub_config is not None and hasattr(sub_config, "_attn_implementation"):
                sub_config._attn_implementation = attention_hook.ATTN_IMPLEMENTATION
        self.lean = backend.lean_forward(model)
        self.num_forward_tokens = 0
        self.graphs: DecodeGraphRunner | None = None
        capture = backend.graph_capture() if graph_batch_size else None
        if capture is not None:
            self.graphs = DecodeGraphRunner(self.forward, self.kv_cache.pool, capture, self.device, block_size,
                                            graph_batch_size, -(-max_model_len // block_size))

    def capture_graphs(self, progress: bool = True) -> float:
        """Capture the decode graphs of every batch bucket and KV pool now; the seconds it took
        (0.0 without graphs)."""
        if self.graphs is None:
            return 0.0
        return self.graphs.capture_all(range(len(self.kv_cache.pools)), progress)

    @torch.inference_mode()
    def warm_up_prefill(self, tokens: int = 32) -> None:
        """One forward over a synthetic prefill of ``tokens`` tokens (one sequence) that writes no
        KV (its slots are -1) and reads only block 0 of the first pool, its logits dropped: kernels
        that only prefill steps run (Triton's prefill attention on CUDA) compile now rather than
        inside the first request."""
        blocks = -(-tokens // self.block_size)
        host = HostBatch(
            token_ids=np.zeros(tokens, dtype=np.int64), positions=np.arange(tokens, dtype=np.int64),
            slots=np.full(tokens, -1, dtype=np.int64), query_start=np.array([0, tokens], dtype=np.int32),
            seq_lens=np.array([tokens], dtype=np.int32), block_tables=np.zeros((1, blocks), dtype=np.int32),
            sample_rows=np.array([tokens - 1], dtype=np.int64), pending_rows=[], pending_requests=[],
            query_lens=[tokens], num_seqs=1, num_decodes=0, block_size=self.block_size)
        ids, positions, meta, keep = device_batch(host, self.device)
        self.forward(ids, positions, meta, self.kv_cache.pool(0), keep).sum().item()

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """The per-pool KV tensors (read-only view for tests and tools)."""
        return self.kv_cache.pools

    @property
    def captures_graphs(self) -> bool:
        return self.graphs is not None

    def replays_graph(self, plan: StepPlan) -> bool:
        """Whether the step replays a captured graph (else its launch is the model's Python forward,
        milliseconds of host time)."""
        return self.graphs is not None and not plan.is_empty and self.graphs.supports(plan)

    def release(self) -> None:
        """Drop the captured graphs and the KV tensors (device memory); the runner cannot run after this."""
        self.graphs = None
        self.lean = None  # it holds views of the KV tensors
        self.kv_cache.release()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """The model over one flattened step; float32 logits of the rows in ``keep``."""
        if self.lean is not None:
            return self.lean(ids, positions, meta, kv, keep, self.op)
        step = attention_hook.StepContext(meta=meta, kv_cache=kv, op=self.op)
        out = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=keep,
                         sagellm_step=step)
        return out.logits[0].float()

    @torch.inference_mode()
    def execute(self, plan: StepPlan, feed: TokenFeed | None = None, replay: bool | None = None) -> torch.Tensor:
        """Queue the step; return float32 logits [num_sampled, vocab] for the chunks that sample.
        ``replay``: `replays_graph` if the caller has asked it already.

        Nothing here waits for the device, so the host can prepare the next step meanwhile."""
        self.kv_cache.copy_blocks(plan.transfers)
        if not plan.chunks:
            return torch.empty((0, 0))
        if replay is None:
            replay = self.replays_graph(plan)
        if replay and self.graphs is not None:
            self.num_forward_tokens += len(plan.chunks)
            return self.graphs.run(plan, feed)
        return self.run_eager(plan, feed)

    @torch.inference_mode()
    def run_eager(self, plan: StepPlan, feed: TokenFeed | None = None) -> torch.Tensor:
        """The step through the model's Python forward (any mix of prefill and decode)."""
        host = build_host_batch(plan, self.block_size)
        ids, positions, meta, keep = device_batch(host, self.device)
        feed_pending(ids, host.pending_rows, host.pending_requests, feed)
        self.num_forward_tokens += int(ids.shape[0])
        logits = self.forward(ids, positions, meta, self.kv_cache.pool(plan.pool), keep)
        return logits if host.sample_rows.size else logits[:0]
