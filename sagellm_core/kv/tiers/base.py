"""The KV tier contract: a store of full KV blocks keyed by their salted chained hash.

A tier holds blocks as raw bytes (one block: ``[num_layers, 2, block_size, num_kv_heads, head_dim]``
of the KV dtype, viewed as uint8) with the token ids the block caches. Tiers are stacked top to
bottom (host memory, then disk, then plugin tiers); `sagellm_core.kv.tiers.store.TierStore` moves
blocks between them and the device pool. When a tier is full the store asks it for a victim
(``victim()``) and moves that block one tier down.
"""

from __future__ import annotations

import abc
import hashlib
from array import array
from typing import Any, Callable, Iterable

import numpy as np

import attrs
import torch

KEY_BYTES = 16


def root_key(cache_salt: str | None) -> bytes:
    """The parent key of a prompt's first block; a salt makes every key of its chain different."""
    if cache_salt is None:
        return b""
    return hashlib.blake2b(b"sagellm-cache-salt\0" + cache_salt.encode(), digest_size=KEY_BYTES).digest()


def chain_key(parent: bytes, token_ids: Iterable[int]) -> bytes:
    """Key of a full block: blake2b over its parent's key and its tokens (stable across processes)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=KEY_BYTES).digest()


@attrs.frozen
class TierContext:
    """What a tier factory gets: the shape of one block and where the engine runs.

    ``block_shape``: the uint8 shape of one block; ``fingerprint``: identifies the model weights,
    dtypes, block size and KV layout (a persistent tier keeps blocks of other fingerprints apart);
    ``config``: the `KVTiersConfig`; ``options``: the validated ``kv_tiers.options.<name>``.
    """

    block_shape: tuple[int, ...]
    device: torch.device
    fingerprint: str
    config: Any
    options: Any = None

    @property
    def block_bytes(self) -> int:
        count = 1
        for size in self.block_shape:
            count *= size
        return count


@attrs.frozen
class TierBlock:
    """A block read from a tier: uint8 data of the context's block shape, and its token ids."""

    data: torch.Tensor
    token_ids: tuple[int, ...]


@attrs.define
class TierStats:
    """Counters of one tier: ``hits`` / ``loads`` blocks found here at admission and loaded from here
    into the device pool; ``load_bytes`` / ``load_seconds``: for the host tier (or the top tier
    without one) the host-to-device copies (every block copied up, including those read from below
    first; device time between the copy batch's events on CUDA), for a tier below it its reads into
    host memory: the wall time during which at least one of them was in flight, each read charged its
    share (`sagellm_core.kv.tiers.store.BusyTime`: parallel reads are not counted once per reader);
    ``stores`` blocks written here, ``evictions`` blocks given
    up, ``errors`` failed writes and corrupt reads; ``save_seconds``: step-thread time spent queueing
    device blocks into this (top) tier and making room; ``turned_down``: lookups of a block found
    here that the load gate left to be recomputed (`sagellm_core.kv.tiers.gate`); ``write_drops``:
    blocks a host tier gave up instead of moving them down: the tier below was behind, or the load
    gate had turned it down; ``wait_seconds``: engine-thread time blocked on loads (`TierStore.wait`:
    nothing else could run), charged to the lowest tier the waited-for load reads from."""

    name: str
    num_blocks: int = 0
    capacity_blocks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    hits: int = 0
    stores: int = 0
    loads: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    errors: int = 0
    save_seconds: float = 0.0
    turned_down: int = 0
    write_drops: int = 0
    wait_seconds: float = 0.0

    @property
    def load_bandwidth(self) -> float:
        """Bytes per second of the loads (``load_bytes / load_seconds``): for the host tier the copies
        up to the device pool, for a tier below it its throughput into host memory with its reader
        threads together (0 before any)."""
        return self.load_bytes / self.load_seconds if self.load_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "load_bandwidth": self.load_bandwidth}


class KVTier(abc.ABC):
    """One tier. ``put`` is only called when ``has_room()``; the store makes room by moving
    ``victim()`` down (``get`` then ``evict``).

    ``get`` returns a block whose ``data`` stays valid until the next ``put`` of this tier, or None when the block is missing or unreadable (a corrupt block is dropped and
    counted in ``stats.errors``; the caller recomputes it).
    """

    name = "abstract"
    persistent = False
    """Whether blocks outlive the process (the engine writes its cached blocks here at shutdown)."""

    def __init__(self, context: TierContext) -> None:
        self.context = context
        self.stats = TierStats(self.name)

    @abc.abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether the tier holds ``key`` (no data is read)."""

    @abc.abstractmethod
    def get(self, key: bytes) -> TierBlock | None:
        """The block of ``key`` (and mark it recently used), or None."""

    @abc.abstractmethod
    def put(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> bool:
        """Store a block (``data``: uint8 of the block shape, on the device or the host). False when
        it could not be stored (an I/O error: logged and counted, nothing else changes)."""

    @abc.abstractmethod
    def has_room(self) -> bool:
        """Whether one more block fits."""

    @abc.abstractmethod
    def victim(self) -> bytes | None:
        """The key this tier gives up first when it needs room (None when empty)."""

    @abc.abstractmethod
    def evict(self, key: bytes) -> None:
        """Drop ``key`` if present."""

    @abc.abstractmethod
    def keys(self) -> list[bytes]:
        """Every key held, oldest use first."""

    def touch(self, key: bytes) -> None:
        """``key`` was hit at admission (default: nothing; LRU tiers move it to the young end)."""

    thread_safe_reads = False
    """Whether `read_into` may run on a background thread (then it must not change the tier's
    bookkeeping: `read_done` does that on the engine thread)."""

    def read_into(self, key: bytes, out: np.ndarray) -> tuple[int, ...] | None:
        """Copy ``key``'s block into ``out`` (uint8, the block's bytes); its token ids, or None when
        it is missing or unreadable. Default: `get` and a copy (on the engine thread)."""
        block = self.get(key)
        if block is None:
            return None
        np.copyto(out.reshape(-1), block.data.reshape(-1).numpy())
        return block.token_ids

    def read_done(self, key: bytes, ok: bool) -> None:
        """The engine thread learns how a `read_into` of ``key`` ended (default: nothing)."""

    def put_deferred(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...], ready: Any,
                     release: Callable[[], None]) -> bool:
        """Store a block whose host ``data`` stays valid until ``release()`` is called (from any
        thread); ``ready``: an event to ``synchronize()`` before reading ``data`` (None: readable now).
        Default: wait, `put`, release at once. A tier with a background writer keeps the reference
        and releases when its write is done."""
        try:
            if ready is not None:
                ready.synchronize()
            return self.put(key, data, token_ids)
        finally:
            release()

    def ready(self) -> None:
        """Wait until every ``put`` so far has landed (asynchronous copies to the host, background
        file writes)."""

    def close(self) -> None:
        """Release resources (files stay on disk)."""
