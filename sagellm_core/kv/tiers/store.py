"""The tier stack under one device KV pool: blocks the pool evicts move down, prefix hits below the
pool are copied up into freshly allocated device blocks.

Data flow (one host slab, indexed by slot, under every copy):

* Down: the pool's manager queues evicted (or, write-through, completed) blocks with `save`; once
  per step (`flush`, at the end of planning and before any load) they are copied in one batch into
  slots of the host slab: on CUDA one gather of all blocks and layers on a dedicated copy stream
  (after the compute stream's queued work), then one device-to-host copy per run of consecutive
  slots, an event recorded, and the compute stream waits for that event before it may overwrite the
  evicted blocks; on the CPU plain memcpys. A full host tier hands its least recently used slot to
  the tier below without copying it (`KVTier.put_deferred`): the disk tier's writer thread waits
  for the slot's event, checksums and writes the file and releases the slot; until then the block
  stays readable in the host tier. Without a host tier a private slab of ``STAGING_BLOCKS`` slots
  stages blocks on their way to the top tier. Blocks saved while every host slot is busy draining go
  down through a second slab of ``STAGING_BLOCKS`` slots, pinned once at `bind` (a flush allocates
  no host memory; beyond its free slots blocks are dropped, counted in ``write_drops``).
* Up: `start_load` resolves a request's blocks found below the pool: host-resident blocks are copied
  up at once (one batch: a host-to-device copy per run of slots into a device buffer, one scatter
  into the pool, start and end events on the copy stream); blocks on a lower tier are read into host
  slots on a reader thread (`KVTier.read_into`; tiers without thread-safe reads read on the engine
  thread). `poll` is non-blocking: once a ticket's reads have landed it copies those blocks up too
  (the chain ends at the first missing or corrupt block), publishes them in the host tier (hot
  blocks move up), and reports done when its events have completed (`event.query()`, never a
  synchronize on the engine thread), or, asked to ``order``, at once with the compute stream
  waiting for those events: the scheduler then admits the request into the step it is planning.

Ordering: a copy of device blocks waits for the engine steps that used them (`StepEvents`: blocks
are stamped with the last planned step when freed), not for all queued compute. Every copy that
touches the slab runs on the one copy stream, so a slot's reuse is in stream order; a thread that
touches a slot's bytes waits for the slot's last copy event first. A request freed while its load is
in flight makes the compute stream wait for that load, so its blocks can be handed out again at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any, Callable, Iterator, Sequence

import attrs
import numpy as np
import torch

from sagellm_core.kv.tiers.base import KVTier, TierStats
from sagellm_core.kv.tiers.gate import LoadGate
from sagellm_core.kv.tiers.host import HostTier
from sagellm_core.kv.tiers.steps import StepEvents

STAGING_BLOCKS = 64
"""Slots of the private host slab that stages blocks when no host tier is configured."""

MIN_PENDING_WRITES = 64
"""Blocks a host tier may have on their way to the tier below before it drops victims instead
(`pending_write_limit`)."""

READERS = min(4, os.cpu_count() or 1)
"""Reader threads for the tiers below the host slab (a disk read and its checksum release the GIL:
one thread read about 0.9 GB/s on an H100 host, under a tenth of its page cache's speed)."""


@attrs.frozen
class TierItem:
    """A device block and the tier key and token ids of the prefix block it holds (or will hold)."""

    block_id: int
    key: bytes
    token_ids: tuple[int, ...]
    after_step: int | None = None
    """The last engine step that may still use the device block (`StepEvents.mark` when it was
    freed; -1: none); None: any step queued so far."""


@attrs.define(eq=False)
class LoadTicket:
    """A chain of blocks on its way up to the device pool (one request's prefix below the pool).

    ``levels[i]``: the tier item ``i`` is loaded from; ``limit``: items considered (the chain was cut
    at admission after them); ``fetches`` / ``fetch_slots``: reads from below into host slots, by
    item (a slot of None: the host slab had no free slot, the block is read into ``fetch_buffers``);
    ``events``: the copy-stream end events of its host-to-device batches (None on the CPU);
    ``count``: the leading items loaded, once the reads have resolved.
    """

    items: list[TierItem]
    levels: list[int] = attrs.field(factory=list)
    limit: int = 0
    fetches: dict[int, Future[tuple[tuple[int, ...] | None, float]]] = attrs.field(factory=dict)
    fetch_slots: dict[int, int | None] = attrs.field(factory=dict)
    fetch_buffers: dict[int, torch.Tensor] = attrs.field(factory=dict)
    events: list[Any] = attrs.field(factory=list)
    count: int | None = None
    cancelled: bool = False

    @property
    def after_step(self) -> int | None:
        """The last step that may still use any of the target blocks (`latest_step`)."""
        return latest_step(self.items)


def slot_runs(pairs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``pairs`` of (position in a batch, slot), sorted by slot, as runs ``(position, slot, length)``
    of consecutive positions and slots: one copy each."""
    runs: list[tuple[int, int, int]] = []
    for position, slot in pairs:
        if runs and runs[-1][0] + runs[-1][2] == position and runs[-1][1] + runs[-1][2] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, slot, 1))
    return runs


class TierStore:
    """Tiers top (fastest) to bottom; ``write_mode`` ``back``: a block moves down when the device
    pool evicts it; ``through``: when it becomes a full cached block."""

    def __init__(self, tiers: Sequence[KVTier], device: torch.device, write_mode: str = "back",
                 gate: LoadGate | None = None) -> None:
        self.tiers = list(tiers)
        self.device = device
        self.write_mode = write_mode
        self.gate = gate if gate is not None else LoadGate()
        self.pool: torch.Tensor | None = None
        self._pool_array: np.ndarray | None = None  # the CPU pool, for copies that skip torch's thread pool
        if not self.tiers:
            raise ValueError("a tier store needs at least one tier")
        top = self.tiers[0]
        self.host_visible = isinstance(top, HostTier)
        self.host: HostTier = top if isinstance(top, HostTier) else HostTier(
            attrs.evolve(top.context), STAGING_BLOCKS * top.context.block_bytes)
        self._saves: list[TierItem] = []
        self._orphans: list[LoadTicket] = []  # cancelled tickets whose reads are still running
        self._overflow = WriteCount()  # blocks in staging slots on their way to the tier below
        self._staging: HostTier | None = None  # slots for blocks with no free host slot (`_save_overflow`)
        self._stream: Any = None
        self._reader: ThreadPoolExecutor | None = None
        self._timings: list[tuple[Any, Any, int, KVTier]] = []
        self._busy = [BusyTime() for _ in self.tiers]  # each tier's reads in flight (`read_job`)
        self.steps = StepEvents()
        self.ordered_loads = os.environ.get("SAGELLM_KV_LOAD_ORDERED") != "0"  # 0: admit once landed (A/B)

    def bind(self, pool: torch.Tensor) -> None:
        """The device pool ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, seen
        as bytes ``[num_layers * 2, num_blocks, block bytes per layer and K/V]`` (a block: one row per
        layer and K/V, each contiguous; a host slot holds the rows of one block back to back)."""
        layers, kv, num_blocks = pool.shape[:3]
        self.pool = pool.view(torch.uint8).view(layers * kv, num_blocks, -1)
        self._pool_array = self.pool.numpy() if self.pool.device.type == "cpu" else None
        if self._staging is None and len(self.tiers) > (1 if self.host_visible else 0):
            self._staging = HostTier(attrs.evolve(self.host.context), STAGING_BLOCKS * self.host.context.block_bytes)

    # ---- lookups -------------------------------------------------------------------------------
    def find_loadable(self, key: bytes, block_size: int) -> int | None:
        """`find`, then None unless loading the block from that tier beats recomputing it (`LoadGate`)."""
        level = self.find(key)
        return level if level is not None and self.gate.worth_loading(level, self.tiers, block_size) else None

    def find(self, key: bytes) -> int | None:
        """The level of the highest tier holding ``key`` (marked recently used), or None."""
        for level, tier in enumerate(self.tiers):
            if tier.contains(key):
                tier.touch(key)
                return level
        return None

    # ---- down ----------------------------------------------------------------------------------
    def save(self, item: TierItem) -> None:
        """Queue a device block for the top tier; it is copied at the next `flush`, before the step
        that may overwrite it is launched."""
        self._saves.append(item)

    def end_planning(self) -> None:
        """Once per engine step, after planning: copy the queued blocks down (`flush`) and count the
        step (`StepEvents.step_planned`)."""
        self.flush()
        self.steps.step_planned()

    def step_launched(self) -> None:
        """The engine queued the last planned step's device work: its end event lets later copies
        of the blocks it used wait for it alone (`StepEvents`)."""
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.steps.step_launched(event)

    def flush(self) -> None:
        """Copy the queued blocks into host slots in one batch (more only when the host tier must
        make room in between), handing them on to the top tier when it is not the host tier."""
        self._poll_orphans()
        if not self._saves:
            return
        tick = time.perf_counter()
        saves, self._saves = self._saves, []
        if self.gate.declines(0, self.tiers):  # the top tier is turned down: nothing written (nor below)
            self.tiers[0].stats.write_drops += len(saves)
            return
        if self.host_visible:
            self._drain_ahead(self.host, 0, len(saves))
        batch: list[tuple[int, int]] = []
        keys: dict[bytes, None] = {}  # those taken this flush, in order
        overflow: list[TierItem] = []
        taken: list[TierItem] = []
        top = self.tiers[0]
        for item in saves:
            if item.key in keys or top.contains(item.key):
                top.touch(item.key)
                continue
            if not self.host.has_room():
                overflow.append(item)  # every slot is busy (draining): no waiting for the writer
                continue
            batch.append((item.block_id, self.host.reserve(item.key, item.token_ids)))
            keys[item.key] = None
            taken.append(item)
        self._copy_down(batch, after_step=latest_step(taken))
        self._hand_down_staged(list(keys))
        self._save_overflow(overflow)
        self.tiers[0].stats.save_seconds += time.perf_counter() - tick

    def _save_overflow(self, items: list[TierItem]) -> None:
        """Blocks the host slab has no free slot for go straight to the tier below it through free
        slots of the staging slab (pinned once at `bind`: nothing is allocated here), one batch;
        those beyond the free staging slots or `pending_write_limit` are dropped (``write_drops``),
        as all are with nothing below."""
        level = 1 if self.host_visible else 0
        staging = self._staging
        if not items or level >= len(self.tiers) or staging is None:
            return
        tier = self.tiers[level]
        items = [item for item in items if not tier.contains(item.key)]
        if not items:
            return
        staging.collect_released()
        limit = pending_write_limit(self.host.capacity)
        room = 0 if self.gate.declines(level, self.tiers) else max(0, limit - self._pending_writes(self.host))
        room = min(room, len(staging.free_slots))
        self.host.stats.write_drops += max(0, len(items) - room)
        items = items[:room]
        if not items:
            return
        self._copy_down([(item.block_id, staging.reserve(item.key, item.token_ids)) for item in items], staging,
                        latest_step(items))
        for item in items:
            self._make_room(level)
            if not tier.has_room():
                staging.evict(item.key)
                continue
            self._overflow.add()
            slot = staging.drain(item.key)
            tier.put_deferred(item.key, staging.slab[slot], item.token_ids, staging.events.get(slot),
                              functools.partial(self._staged_written, staging, item.key))

    def _staged_written(self, staging: HostTier, key: bytes) -> None:
        """The tier below is done with a staged block (its writer thread): the slot is free again."""
        self._overflow.done()
        staging.release_drained(key)

    def _hand_down_staged(self, keys: list[bytes]) -> None:
        """Without a host tier: staged blocks go on to the top tier (its writer releases the slots;
        while all are busy, the next flush stages through the staging slab's)."""
        if self.host_visible:
            return
        for key in keys:
            self._move_down(self.host, key, 0)

    def _drain_ahead(self, tier: HostTier, level: int, needed: int) -> None:
        """Hand least recently used blocks of host tier ``level`` down until its free and draining
        slots cover ``needed`` plus a headroom of an eighth of it (so the writer below works between
        steps); at the bottom, only ``needed`` blocks are dropped. Once `pending_write_limit` blocks
        are on their way down, victims are dropped instead (``stats.write_drops``) as far as
        ``needed`` requires: the device evicts faster than the tier below writes, and waiting for it
        or queueing without bound (in pinned memory) would stall or swell the engine. While the load
        gate turns the tier below down, victims are dropped at once: its background writes would cost
        the engine thread (the interpreter lock) for blocks nobody loads."""
        tier.collect_released()
        if level + 1 >= len(self.tiers):
            self._evict_until(tier, lambda: len(tier.free_slots) >= needed)
            return
        if self.gate.declines(level + 1, self.tiers):  # nothing is loaded from there now: no writes either
            tier.stats.write_drops += self._evict_until(tier, lambda: len(tier.free_slots) >= needed)
            return
        target = needed + max(1, tier.capacity // 8)
        limit = pending_write_limit(tier.capacity)
        while len(tier.free_slots) + len(tier.draining) < target and self._pending_writes(tier) < limit:
            key = tier.victim()
            if key is None:
                return
            self._move_down(tier, key, level + 1)
        # the blocks without a free slot will be staged for the tier below: beyond the limit, room is made
        tier.stats.write_drops += self._evict_until(tier, lambda: len(tier.free_slots) >= needed or (
            self._pending_writes(tier) + needed - len(tier.free_slots) <= limit))

    def _pending_writes(self, tier: HostTier) -> int:
        """Blocks of ``tier`` on their way to the tier below: draining slots and staged overflow."""
        return len(tier.draining) + self._overflow.count

    @staticmethod
    def _evict_until(tier: HostTier, done: Callable[[], bool]) -> int:
        """Drop ``tier``'s least recently used blocks until ``done()``; how many."""
        dropped = 0
        while not done():
            key = tier.victim()
            if key is None:
                break
            tier.evict(key)
            dropped += 1
        return dropped

    def _make_room(self, level: int) -> None:
        """Room for one block in tier ``level``: victims move one tier down (or are dropped at the
        bottom); a host tier whose slots are all draining waits for the writer below."""
        tier = self.tiers[level]
        if isinstance(tier, HostTier):
            self._drain_ahead(tier, level, 1)
            if not tier.has_room():
                tier.wait_released()
            return
        while not tier.has_room():
            key = tier.victim()
            if key is None:
                return
            if level + 1 < len(self.tiers):
                self._move_down(tier, key, level + 1)
            else:
                tier.evict(key)

    def _move_down(self, tier: KVTier, key: bytes, level: int) -> None:
        """Give ``key`` of ``tier`` to tier ``level``: a host slot by reference (released by the tier
        below when it is done with it), any other tier's block through `get` and `put`."""
        below = self.tiers[level]
        if below.contains(key):
            below.touch(key)
            tier.evict(key)
            return
        self._make_room(level)
        if not below.has_room():
            tier.evict(key)
            return
        if isinstance(tier, HostTier):
            slot = tier.drain(key)
            below.put_deferred(key, tier.slab[slot], tier.tokens[slot], tier.events.get(slot),
                               functools.partial(tier.release_drained, key))
            return
        block = tier.get(key)
        if block is not None:
            below.put(key, block.data, block.token_ids)
        tier.evict(key)

    def _store(self, level: int, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> None:
        """Synchronously store a host block in tier ``level`` (shutdown)."""
        tier = self.tiers[level]
        if tier.contains(key):
            tier.touch(key)
            return
        self._make_room(level)
        if tier.has_room():
            tier.put(key, data, token_ids)

    def persist(self, device_items: Sequence[TierItem]) -> None:
        """Shutdown: write the device pool's cached blocks and every block of the tiers above the
        first persistent tier into it, so a restarted engine finds them."""
        self.flush()
        target = next((i for i, tier in enumerate(self.tiers) if tier.persistent), None)
        if target is None or self.pool is None:
            return
        for item in device_items:
            self._store(target, item.key, self._device_block(item.block_id).cpu(), item.token_ids)
        for tier in self.tiers[:target]:
            tier.ready()
            for key in tier.keys():
                block = tier.get(key)
                if block is not None:
                    self._store(target, key, block.data, block.token_ids)

    def _device_block(self, block_id: int) -> torch.Tensor:
        if self.pool is None:
            raise RuntimeError("the tier store is not bound to a device pool")
        return self.pool[:, block_id]

    # ---- up ------------------------------------------------------------------------------------
    def start_load(self, items: Sequence[TierItem]) -> LoadTicket:
        """Start copying ``items`` (a chain, in order) from the tiers into their device blocks; never
        blocks on the device or on a file. `poll` tells when it is done and how many leading items
        were loaded (a block missing, corrupt or holding other tokens ends the chain there)."""
        self.flush()  # blocks evicted for these fresh blocks are copied out first
        ticket = LoadTicket(list(items))
        resident: list[tuple[int, int]] = []
        for index, item in enumerate(ticket.items):
            level = self.find(item.key)
            if level is None or not self._resident_ok(level, item):
                break
            ticket.levels.append(level)
            if level == 0 and self.host_visible:
                resident.append((item.block_id, self.host.slot_of(item.key)))  # type: ignore[arg-type]
        ticket.limit = len(ticket.levels)
        if resident:  # before any slot is reserved below: making room may give these slots up
            ticket.events.append(self._copy_up(resident, ticket.after_step))
        for index in range(ticket.limit):
            if ticket.levels[index] != 0 or not self.host_visible:
                self._start_fetch(ticket, index)
        return ticket

    def _resident_ok(self, level: int, item: TierItem) -> bool:
        """A host-resident block must hold the item's tokens (else it is dropped and counted)."""
        if level != 0 or not self.host_visible:
            return True
        slot = self.host.slot_of(item.key)
        if slot is not None and self.host.tokens.get(slot) == item.token_ids:
            return True
        self.host.stats.errors += 1
        self.host.evict(item.key)
        return False

    def _start_fetch(self, ticket: LoadTicket, index: int) -> None:
        """Read item ``index`` from its tier into a free host slot, else a temporary host buffer (on
        a reader thread when the tier allows it); never waits for a slot."""
        slot = self.host.reserve_filling()
        if slot is not None:
            out, ready = self.host.slab_array[slot], self.host.events.get(slot)
        else:  # no free slot: a temporary host buffer (the block is not kept in the host tier)
            buffer = torch.empty(self.host.context.block_shape, dtype=torch.uint8,
                                 pin_memory=self.device.type == "cuda")
            ticket.fetch_buffers[index] = buffer
            out, ready = buffer.numpy(), None
        level = ticket.levels[index]
        tier = self.tiers[level]
        job = functools.partial(read_job, tier, ticket.items[index].key, out, ready, self._busy[level])
        if tier.thread_safe_reads:
            if self._reader is None:
                self._reader = ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="sagellm-kv-read")
            future = self._reader.submit(job)
        else:
            future = Future()
            future.set_result(job())
        ticket.fetch_slots[index] = slot
        ticket.fetches[index] = future

    def poll(self, ticket: LoadTicket, order: bool = False) -> bool:
        """Whether the ticket's blocks are in the device pool (``ticket.count`` of them); never waits.
        Once its reads have landed, copies the blocks read from below up (one batch). ``order``:
        once the copies are queued, the compute stream waits for them and True is returned at once
        (the step planned now may read the blocks: it runs after the copies, not a step later)."""
        if ticket.count is None:
            if not all(future.done() for future in ticket.fetches.values()):
                return False
            self._resolve(ticket)
        if order and self.ordered_loads and self.device.type == "cuda":
            compute = torch.cuda.current_stream(self.device)
            for event in ticket.events:
                if event is not None:
                    compute.wait_event(event)
            return True
        return all(event is None or event.query() for event in ticket.events)

    def wait(self, ticket: LoadTicket) -> None:
        """Block until `poll` is True (the scheduler calls it only when nothing else can run); the
        time is charged to the lowest tier the ticket reads from (``TierStats.wait_seconds``)."""
        tick = time.perf_counter()
        wait_futures(list(ticket.fetches.values()))
        self.poll(ticket)
        for event in ticket.events:
            if event is not None:
                event.synchronize()
        if ticket.levels:
            self.tiers[max(ticket.levels)].stats.wait_seconds += time.perf_counter() - tick

    def cancel(self, ticket: LoadTicket) -> None:
        """The request went away: later compute waits for copies already queued into its blocks
        (they may be handed out at once); reads still running are resolved later (their slots)."""
        ticket.cancelled = True
        if self.device.type == "cuda":
            compute = torch.cuda.current_stream(self.device)
            for event in ticket.events:
                if event is not None:
                    compute.wait_event(event)
        if ticket.count is None:
            self._orphans.append(ticket)

    def _poll_orphans(self) -> None:
        self._orphans = [t for t in self._orphans if not all(f.done() for f in t.fetches.values())
                         or self._resolve(t)]

    def _resolve(self, ticket: LoadTicket) -> bool:
        """The reads of ``ticket`` have landed: count the chain, copy its blocks read from below up,
        publish them in the host tier (or free their staging slots). False (for filters)."""
        count, cut, batch = 0, False, []
        for index in range(ticket.limit):
            future = ticket.fetches.get(index)
            if future is not None:
                tokens, seconds = future.result()
                item, tier = ticket.items[index], self.tiers[ticket.levels[index]]
                ok = tokens is not None and tokens == item.token_ids
                tier.read_done(item.key, ok)
                if ok and not cut and not ticket.cancelled:
                    tier.stats.load_seconds += seconds
                    tier.stats.load_bytes += self.host.context.block_bytes
                    slot = ticket.fetch_slots[index]
                    batch.append((item.block_id, slot if slot is not None else ticket.fetch_buffers[index]))
                cut = cut or not ok
            count += 0 if cut else 1
        if batch:
            ticket.events.append(self._copy_up(batch, ticket.after_step))
        ticket.fetch_buffers.clear()  # a queued copy keeps its pinned block (the host allocator's event)
        for index, slot in ticket.fetch_slots.items():
            if slot is None:
                continue
            tokens = ticket.fetches[index].result()[0]
            item = ticket.items[index]
            if self.host_visible and tokens == item.token_ids:
                self.host.publish(slot, item.key, item.token_ids)
            else:
                self.host.unfill(slot)
        ticket.count = count
        if not ticket.cancelled:
            for index in range(count):
                stats = self.tiers[ticket.levels[index]].stats
                stats.hits += 1
                stats.loads += 1
        return False

    # ---- batched copies --------------------------------------------------------------------------
    def _copy_down(self, batch: list[tuple[int, int]], host: HostTier | None = None,
                   after_step: int | None = None) -> None:
        """Device blocks into slots of ``host`` (the host slab by default), ``batch`` of (block id,
        slot), once the steps up to ``after_step`` have written them; the slots' events are set."""
        host = self.host if host is None else host
        if not batch:
            return
        if self.device.type != "cuda":
            for block_id, slot in batch:
                self._copy_block_down(block_id, host.slab[slot])
            return
        batch = sorted(batch, key=lambda pair: pair[1])
        slab = host.slab.view(host.capacity, -1)
        with self._on_copy_stream(after_step) as (stream, event):
            staged = self._gather([block_id for block_id, _ in batch])
            for position, slot, length in slot_runs([(i, slot) for i, (_, slot) in enumerate(batch)]):
                slab[slot:slot + length].copy_(staged[position:position + length].view(length, -1),
                                               non_blocking=True)
        for _, slot in batch:
            host.events[slot] = event

    def _copy_block_down(self, block_id: int, out: torch.Tensor) -> None:
        """One device block into host ``out`` on a backend without a copy stream (memcpys on the CPU)."""
        pool = self._bound()
        rows = pool.shape[0]
        if self._pool_array is not None:
            np.copyto(out.numpy().reshape(rows, -1), self._pool_array[:, block_id])
        else:  # other accelerators: a plain blocking copy
            out.view(rows, -1).copy_(pool[:, block_id])

    @contextlib.contextmanager
    def _on_copy_stream(self, after_step: int | None) -> Iterator[tuple[Any, Any]]:
        """Device-to-host work on the copy stream after the steps up to ``after_step`` (`_wait_steps`);
        the compute stream then waits for the recorded event (it may overwrite those blocks after)."""
        stream, compute = self._copy_stream(), torch.cuda.current_stream(self.device)
        self._wait_steps(stream, after_step)  # the blocks' last writes have run
        event = torch.cuda.Event()
        with torch.cuda.stream(stream):
            yield stream, event
            event.record(stream)
        compute.wait_event(event)

    def _gather(self, block_ids: list[int]) -> torch.Tensor:
        """On the copy stream: the blocks ``[n, rows, row bytes]`` in one gather over blocks and layers."""
        index = pinned_index(block_ids).to(self.device, non_blocking=True)
        return self._bound().transpose(0, 1)[index]

    def _copy_up(self, batch: Sequence[tuple[int, int | torch.Tensor]], after_step: int | None) -> Any:
        """Host blocks into device blocks, ``batch`` of (block id, host slot or host buffer), once
        the steps up to ``after_step`` are done with those blocks; the batch's end event (None on
        the CPU, where the copy is done on return). Timed for the top tier's load statistics."""
        pool = self._bound()
        top = self.tiers[0]
        nbytes = len(batch) * self.host.context.block_bytes
        sources = [self.host.slab[src] if isinstance(src, int) else src for _, src in batch]
        if self.device.type != "cuda":
            tick = time.perf_counter()
            rows = pool.shape[0]
            for (block_id, _), source in zip(batch, sources):
                if self._pool_array is not None:
                    np.copyto(self._pool_array[:, block_id], source.numpy().reshape(rows, -1))
                else:
                    pool[:, block_id].copy_(source.view(rows, -1))
            top.stats.load_seconds += time.perf_counter() - tick
            top.stats.load_bytes += nbytes
            return None
        stream = self._copy_stream()
        self._wait_steps(stream, after_step)  # the fresh blocks' last readers have run
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            staged = torch.empty((len(batch), pool.shape[0], pool.shape[2]), dtype=torch.uint8, device=self.device)
            flat, slab = staged.view(len(batch), -1), self.host.slab.view(self.host.capacity, -1)
            slots = sorted((entry, i) for i, (_, entry) in enumerate(batch) if isinstance(entry, int))
            for position, first, length in _position_runs(slots):
                flat[position:position + length].copy_(slab[first:first + length], non_blocking=True)
            for i, (_, entry) in enumerate(batch):
                if not isinstance(entry, int):
                    flat[i].copy_(entry.view(-1), non_blocking=True)
            index = pinned_index([block_id for block_id, _ in batch]).to(self.device, non_blocking=True)
            pool[:, index] = staged.transpose(0, 1)  # one scatter over blocks and layers
            end.record(stream)
        for _, entry in batch:
            if isinstance(entry, int):
                self.host.events[entry] = end
        self._timings.append((start, end, nbytes, top))
        return end

    def _wait_steps(self, stream: Any, after_step: int | None) -> None:
        """Make the copy ``stream`` wait for the engine steps up to ``after_step``: the end event
        of the step covering it, nothing when they are done, all queued compute when unknown."""
        covered, event = self.steps.covering_event(after_step)
        if not covered:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        elif event is not None:
            stream.wait_event(event)
        self.steps.count_wait("all" if not covered else "step" if event is not None else "none")

    def _copy_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _bound(self) -> torch.Tensor:
        if self.pool is None:
            raise RuntimeError("the tier store is not bound to a device pool")
        return self.pool

    # ---- stats ---------------------------------------------------------------------------------
    def stats(self) -> list[TierStats]:
        pending = []
        for start, end, nbytes, tier in self._timings:
            if end.query():
                tier.stats.load_seconds += start.elapsed_time(end) / 1000.0
                tier.stats.load_bytes += nbytes
            else:
                pending.append((start, end, nbytes, tier))
        self._timings = pending
        return [attrs.evolve(tier.stats) for tier in self.tiers]

    def ready(self) -> None:
        """Wait until every queued copy, read and write has landed."""
        self.flush()
        if self._reader is not None:
            self._reader.shutdown(wait=True)  # every read submitted has landed (a new pool starts lazily)
            self._reader = None
        self._poll_orphans()
        for tier in self.tiers:
            tier.ready()
        self.host.collect_released()
        if not self.host_visible:
            self.host.ready()
        if self._staging is not None:
            self._staging.collect_released()
            self._staging.ready()

    def close(self) -> None:
        self.ready()
        for tier in self.tiers:
            tier.close()


def latest_step(items: Sequence[TierItem]) -> int | None:
    """The last step that may use any of the items' device blocks (None when any is unknown)."""
    latest = -1
    for item in items:
        if item.after_step is None:
            return None
        latest = max(latest, item.after_step)
    return latest


def pending_write_limit(capacity: int) -> int:
    """Blocks of a host tier of ``capacity`` slots that may be draining to the tier below at once."""
    return max(MIN_PENDING_WRITES, capacity // 4)


class WriteCount:
    """Writes queued to a tier below and not yet done (``done`` runs on its writer thread)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1

    def done(self) -> None:
        with self._lock:
            self.count -= 1


def _position_runs(slots: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(slot, batch position) pairs sorted by slot as runs (position, slot, length) of consecutive
    slots at consecutive positions."""
    return slot_runs([(position, slot) for slot, position in slots])


def pinned_index(values: list[int]) -> torch.Tensor:
    """An int64 index in pinned host memory (its copy to the device does not wait for the stream)."""
    index = torch.empty(len(values), dtype=torch.int64, pin_memory=True)
    index.numpy()[:] = values
    return index


class BusyTime:
    """The wall time during which at least one of a tier's reads was in flight, split among them:
    while ``n`` reads run together each is charged ``1/n`` of every second, so the charges of all
    reads add up to the busy wall time (``N`` parallel readers are not counted ``N`` times) and
    bytes over their sum is the tier's throughput with its readers together. A read alone is charged
    its own time. Thread-safe; ``clock``: seconds (default `time.perf_counter`)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.perf_counter
        self._lock = threading.Lock()
        self._active = 0
        self._last = 0.0
        self._shared = 0.0  # seconds a read running since the start would have been charged

    def start(self) -> float:
        """A read begins; the mark to hand to `stop`."""
        with self._lock:
            self._advance()
            self._active += 1
            return self._shared

    def stop(self, mark: float) -> float:
        """The read that began at ``mark`` ended: the seconds charged to it."""
        with self._lock:
            self._advance()
            self._active -= 1
            return self._shared - mark

    def _advance(self) -> None:
        now = self._clock()
        if self._active:
            self._shared += (now - self._last) / self._active
        self._last = now


def read_job(tier: KVTier, key: bytes, out: np.ndarray, ready: Any,
             busy: BusyTime | None = None) -> tuple[tuple[int, ...] | None, float]:
    """A reader thread (or the engine thread): wait for the slot's last copy, read ``key`` into it;
    (token ids or None, seconds charged to the read: its share of ``busy``, the tier's `BusyTime`,
    or without one its own time)."""
    if ready is not None:
        ready.synchronize()
    busy = BusyTime() if busy is None else busy
    mark = busy.start()
    tokens = tier.read_into(key, out)
    return tokens, busy.stop(mark)
