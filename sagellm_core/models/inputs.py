"""The one input builder of the runner: a `StepPlan` flattened into host arrays (vectorised with
numpy), then moved to the device in one copy per dtype. The eager path uses the device tensors as
they are; the graph path pads to its bucket and copies them into its static buffers.

On CUDA the host side is pinned memory, so the copies are truly asynchronous: torch's caching
host allocator does not hand a pinned block out again before the copies reading it have run.
"""

from __future__ import annotations

import itertools

import attrs
import numpy as np
import torch

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.plan import PENDING_TOKEN, StepPlan


@attrs.define
class HostBatch:
    """One step's inputs on the host. Rows ``>= num_seqs`` (and tokens ``>= num_tokens``) are
    padding: slot -1 (writes no KV) and context length 0 (attends to nothing)."""

    token_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slots: np.ndarray  # int64 [T]
    query_start: np.ndarray  # int32 [B + 1]
    seq_lens: np.ndarray  # int32 [B]
    block_tables: np.ndarray  # int32 [B, W]
    sample_rows: np.ndarray  # int64 [S]: the row of each sampling chunk's last token
    pending_rows: list[int]  # rows holding PENDING_TOKEN (fed from the device)
    pending_requests: list[str]  # whose token each pending row takes
    query_lens: list[int]
    num_seqs: int
    num_decodes: int  # leading sequences with one query token
    block_size: int


def build_host_batch(plan: StepPlan, block_size: int, pad_to: int = 0, width: int = 0) -> HostBatch:
    """Flatten ``plan`` (padded to ``pad_to`` sequences of one token, and ``width`` block-table
    columns, when given)."""
    chunks = plan.chunks
    num_seqs = len(chunks)
    query_lens = [c.num_tokens for c in chunks]
    rows = max(num_seqs, pad_to)
    lens = np.zeros(rows, dtype=np.int64)
    lens[:num_seqs] = query_lens
    lens[num_seqs:] = 1
    starts = np.zeros(rows, dtype=np.int64)
    starts[:num_seqs] = [c.start for c in chunks]
    cu = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    total = int(cu[-1])
    token_ids = np.zeros(total, dtype=np.int64)
    real = int(cu[num_seqs])
    token_ids[:real] = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64, real)
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1] - starts, lens)
    width = max(width, max((len(c.block_ids) for c in chunks), default=0), 1)
    tables = np.zeros((rows, width), dtype=np.int32)
    for row, chunk in enumerate(chunks):
        tables[row, : len(chunk.block_ids)] = chunk.block_ids
    seq_index = np.repeat(np.arange(rows), lens)
    slots = tables[seq_index, positions // block_size].astype(np.int64) * block_size + positions % block_size
    seq_lens = (starts + lens).astype(np.int32)
    if rows > num_seqs:  # padding rows: no KV write, no context
        slots[real:] = -1
        positions[real:] = 0
        seq_lens[num_seqs:] = 0
    sample_mask = np.fromiter((c.sample for c in chunks), bool, num_seqs)
    pending = [i for i, c in enumerate(chunks) if c.feeds_pending]
    if int(np.count_nonzero(token_ids[:real] == PENDING_TOKEN)) != len(pending):
        raise RuntimeError("a pending token stands where no in-flight step can feed it (not a chunk's last input)")
    leading = next((i for i, n in enumerate(query_lens) if n != 1), num_seqs)
    return HostBatch(
        token_ids=token_ids, positions=positions, slots=slots, query_start=cu.astype(np.int32),
        seq_lens=seq_lens, block_tables=tables, sample_rows=cu[1: num_seqs + 1][sample_mask] - 1,
        pending_rows=[int(cu[i + 1]) - 1 for i in pending], pending_requests=[chunks[i].request_id for i in pending],
        query_lens=query_lens, num_seqs=num_seqs, num_decodes=leading, block_size=block_size,
    )


def _segments(arrays: list[np.ndarray], dtype: torch.dtype) -> list[int]:
    """Start of each array in a packed buffer, aligned to 16 bytes (kernels specialise on aligned
    pointers; an unaligned view would compile another variant)."""
    step = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    starts, offset = [], 0
    for a in arrays:
        starts.append(offset)
        offset += -(-a.size // step) * step
    return starts + [offset]


def _packed(arrays: list[np.ndarray], dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, list[int]]:
    """One flat host tensor holding ``arrays`` at aligned offsets (pinned if ``pin``)."""
    starts = _segments(arrays, dtype)
    host = torch.empty(starts[-1], dtype=dtype, pin_memory=pin)
    view = host.numpy()
    for a, start in zip(arrays, starts):
        view[start: start + a.size] = a.ravel()
    return host, starts


def _split(flat: torch.Tensor, arrays: list[np.ndarray], starts: list[int]) -> list[torch.Tensor]:
    return [flat[start: start + a.size].view(a.shape) for a, start in zip(arrays, starts)]


def stage(arrays: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Same-dtype host arrays as host tensors ready to copy to ``device``: views of one pinned
    buffer on CUDA, the arrays' own memory elsewhere."""
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    host, starts = _packed(arrays, dtype, pin=True)
    return _split(host, arrays, starts)


def to_device(arrays: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Same-dtype host arrays as device tensors of their shapes, in one copy (the arrays' own
    memory on the CPU)."""
    if device.type == "cpu":
        return [torch.from_numpy(a) for a in arrays]
    host, starts = _packed(arrays, dtype, pin=device.type == "cuda")
    return _split(host.to(device, non_blocking=True), arrays, starts)


def device_batch(batch: HostBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                                  torch.Tensor]:
    """(token ids, positions, attention metadata, rows to keep) on ``device``."""
    keep = batch.sample_rows if batch.sample_rows.size else np.zeros(1, dtype=np.int64)
    ids, positions, slots, keep_rows = to_device([batch.token_ids, batch.positions, batch.slots, keep],
                                                 torch.int64, device)
    query_start, seq_lens, tables = to_device([batch.query_start, batch.seq_lens, batch.block_tables],
                                              torch.int32, device)
    meta = AttentionMetadata(
        slot_mapping=slots, query_start_loc=query_start, seq_lens=seq_lens, block_tables=tables,
        query_lens_host=batch.query_lens, seq_lens_host=batch.seq_lens[: batch.num_seqs].tolist(),
        num_decodes=batch.num_decodes, block_size=batch.block_size,
    )
    return ids, positions, meta, keep_rows
