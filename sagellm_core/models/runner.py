"""Model runner: owns the KV tensors and all device work of a step (inputs, forward, block copies)."""

from __future__ import annotations

from typing import Any

import torch

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.backend import Backend
from sagellm_core.attention import hook as attention_hook
from sagellm_core.models.graphs import DecodeGraphRunner
from sagellm_core.models.token_feed import TokenFeed, feed_pending
from sagellm_core.schedulers.base import BlockTransfer, SchedulerOutput


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_shape(model: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a decoder model."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_block(model: Any, block_size: int, dtype: torch.dtype) -> int:
    layers, kv_heads, head_dim = kv_shape(model)
    return layers * 2 * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    """Turns a `SchedulerOutput` into one flattened forward pass and returns the logits to sample."""

    def __init__(self, model: Any, backend: Backend, block_size: int, pool_blocks: list[int],
                 kv_dtype: torch.dtype, max_model_len: int = 0, graph_batch_size: int = 0,
                 cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.backend = backend
        self.device = backend.device()
        self.block_size = block_size
        layers, kv_heads, head_dim = kv_shape(model)
        self.kv_caches = [
            backend.allocate_kv_cache(layers, blocks, block_size, kv_heads, head_dim, cache_dtype or kv_dtype)
            for blocks in pool_blocks
        ]
        self.op = backend.attention_op()
        backend.prepare_model(model, kv_dtype)
        model.config._attn_implementation = attention_hook.register()
        for sub in model.modules():  # sub-configs of composite models
            sub_config = getattr(sub, "config", None)
            if sub_config is not None and hasattr(sub_config, "_attn_implementation"):
                sub_config._attn_implementation = attention_hook.ATTN_IMPLEMENTATION
        self.num_forward_tokens = 0
        self.graphs: DecodeGraphRunner | None = None
        capture = backend.graph_capture() if graph_batch_size else None
        if capture is not None:
            self.graphs = DecodeGraphRunner(self, capture, graph_batch_size, -(-max_model_len // block_size))

    # ---- block copies (strict PD) --------------------------------------------------------------
    def transfer(self, transfers: list[BlockTransfer]) -> None:
        for t in transfers:
            src = torch.tensor(t.src_blocks, device=self.device)
            dst = torch.tensor(t.dst_blocks, device=self.device)
            self.kv_caches[t.dst_pool][:, :, dst] = self.kv_caches[t.src_pool][:, :, src]

    # ---- forward -------------------------------------------------------------------------------
    def build_inputs(self, plan: SchedulerOutput, block_ids: list[list[int]], feed: TokenFeed | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the plan: token ids, positions, attention metadata, and the rows whose logits to keep.

        Pending tokens (sampled by the step in flight) are taken from ``feed`` on the device."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        last_inputs: list[int] = []
        bs = self.block_size
        num_decodes = 0
        for chunk, blocks in zip(plan.chunks, block_ids):
            request = chunk.request
            start, n = request.num_computed_tokens, chunk.num_tokens
            token_ids.extend(request.token_slice(start, start + n))
            positions.extend(range(start, start + n))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            seq_lens.append(start + n)
            num_decodes += n == 1
            last_inputs.append(len(token_ids) - 1)
            if start + n == request.num_tokens:
                sample_rows.append(len(token_ids) - 1)
        max_blocks = max(len(b) for b in block_ids)
        tables = torch.tensor([b + [0] * (max_blocks - len(b)) for b in block_ids], dtype=torch.int32)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=True),
            block_tables=tables.to(device, non_blocking=True),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            num_decodes=num_decodes if all(q == 1 for q in query_lens[:num_decodes]) else 0,
            block_size=bs,
        )
        ids = torch.tensor(token_ids, dtype=torch.int64).to(device, non_blocking=True)
        feed_pending(ids, token_ids, plan.chunks, last_inputs, feed)
        pos = torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True)
        return ids, pos, meta, sample_rows

    def replays_graph(self, plan: SchedulerOutput, block_ids: list[list[int]]) -> bool:
        """Whether the step replays a captured graph (else its launch is the model's Python forward,
        milliseconds of host time)."""
        return self.graphs is not None and self.graphs.supports(plan, block_ids)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, block_ids: list[list[int]], feed: TokenFeed | None = None,
                replay: bool | None = None) -> torch.Tensor:
        """Queue the step; return float32 logits [num_sampled, vocab] for the chunks that complete.
        ``replay``: `replays_graph` if the caller has asked it already.

        Nothing here waits for the device, so the host can prepare the next step meanwhile."""
        self.transfer(plan.transfers)
        if not plan.chunks:
            return torch.empty((0, 0))
        if replay is None:
            replay = self.replays_graph(plan, block_ids)
        if replay and self.graphs is not None:
            self.num_forward_tokens += len(plan.chunks)
            return self.graphs.run(plan, block_ids, feed)
        return self.run_eager(plan, block_ids, feed)

    @torch.inference_mode()
    def run_eager(self, plan: SchedulerOutput, block_ids: list[list[int]], feed: TokenFeed | None = None
                  ) -> torch.Tensor:
        """The step through the model's Python forward (any mix of prefill and decode)."""
        ids, pos, meta, sample_rows = self.build_inputs(plan, block_ids, feed)
        self.num_forward_tokens += int(ids.shape[0])
        keep = torch.tensor(sample_rows or [0], dtype=torch.int64).to(self.device, non_blocking=True)
        step = attention_hook.StepContext(meta=meta, kv_cache=self.kv_caches[plan.pool], op=self.op)
        out = self.model(input_ids=ids[None], position_ids=pos[None], use_cache=False, logits_to_keep=keep,
                         sagellm_step=step)
        logits = out.logits[0].float()
        return logits if sample_rows else logits[:0]
