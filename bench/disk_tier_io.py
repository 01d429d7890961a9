"""Disk tier throughput on the CPU alone (issue 14): `DiskTier` driven the way `TierStore` drives it.

    python bench/disk_tier_io.py [--blocks 256 --capacity 64 --shape llama-3-8b --readers 4 --dir /tmp/x]

Writes ``--blocks`` blocks of the shape's size through ``put_deferred`` (the writer thread: checksum,
file write, rename), waits for them (``ready``), then reads the blocks still held back into host
slots through `sagellm_core.kv.tiers.store.read_job` on ``--readers`` threads (``READERS`` by default:
the store's reader pool) and once more on one thread. The files are fresh, so the reads come from the
page cache. ``--capacity`` (blocks, default ``--blocks``): a tier this small is full after its first
``--capacity`` blocks; the rest are written as the store writes in the steady state of a long run,
each after evicting the least recently used block (``victim``, ``evict``), timed apart from the fill.
``--recycle off`` makes the tier delete evicted files instead of reusing them (``SPARE_FILES = 0``).
``--busy`` keeps a thread running Python meanwhile, as a busy engine thread does: each time a background
thread takes the interpreter lock back after a system call it may wait a switch interval (5 ms).
``--switch-ms`` sets the interpreter's switch interval for that wait.
``--checksum zlib`` makes the tier use zlib's CRC-32 (as before ISA-L) for a before/after on one machine.
Prints GB/s of each phase and the split of one block's work: checksum (zlib and the checksum the tier
uses), open + read of a file, a plain memcpy of a block, a file write, a rename and an unlink.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sagellm_core.kv.tiers import disk as disk_module
from sagellm_core.kv.tiers.base import TierContext, chain_key
from sagellm_core.kv.tiers.disk import DiskTier
from sagellm_core.kv.tiers.store import READERS, BusyTime, read_job

SPARES = getattr(disk_module, "SPARE_FILES", 0)  # the tier's pool of recycled files (0: before recycling)

SHAPES = {  # (layers, K/V, block size, KV heads, head_dim * bytes of bf16)
    "qwen3-0.6b": (28, 2, 16, 8, 128 * 2),
    "llama-3-8b": (32, 2, 16, 8, 128 * 2),
}


def gbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:6.2f} GB/s" if seconds > 0 else "   inf GB/s"


def crc_name() -> str:
    """Which CRC-32 the disk tier uses."""
    return str(getattr(disk_module, "CRC_IMPL", "zlib"))  # the tier before ISA-L had no CRC_IMPL


def timed(fn: Callable[[], object], repeat: int = 5, setup: Callable[[], object] = lambda: None) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` (each after an untimed ``setup()``)."""
    times = []
    for _ in range(repeat):
        setup()
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


class BusyEngine:
    """A thread running Python without pause (an engine thread planning steps: it holds the
    interpreter lock but for the forced switches) while the context is open."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        count = 0
        while not self._stop.is_set():
            for _ in range(1000):
                count += 1

    def __enter__(self) -> "BusyEngine":
        if self.on:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.on:
            self._thread.join()


def make_tier(directory: Path, shape: tuple[int, ...], blocks: int) -> DiskTier:
    context = TierContext(shape, torch.device("cpu"), "bench", None)
    return DiskTier(context, directory, blocks * (context.block_bytes + 4096))


def write_phase(tier: DiskTier, slab: torch.Tensor, keys: list[bytes], tokens: list[tuple[int, ...]],
                first: int = 0) -> float:
    """Seconds to queue every block (the engine thread's part: a full tier evicts its least recently
    used block first, as `TierStore` makes room; at most half the tier's blocks on their way, as
    `sagellm_core.kv.tiers.store.pending_write_limit` bounds them) and have it on disk; block ``i`` holds slab row
    ``i % len(slab)`` (``first``: the index of ``keys[0]``)."""
    in_flight = threading.BoundedSemaphore(max(1, tier.capacity // 2))  # the store's pending write limit
    tick = time.perf_counter()
    for index, key in enumerate(keys):
        while not tier.has_room():
            tier.evict(tier.victim())  # type: ignore[arg-type]
        in_flight.acquire()
        tier.put_deferred(key, slab[(first + index) % len(slab)], tokens[index], None, in_flight.release)
    queued = time.perf_counter() - tick
    tier.ready()
    total = time.perf_counter() - tick
    print(f"  queueing on the caller's thread: {queued * 1e3:8.1f} ms ({queued / len(keys) * 1e6:.0f} us a block)")
    return total


def read_phase(tier: DiskTier, out: np.ndarray, keys: list[bytes], tokens: list[tuple[int, ...]],
               readers: int) -> tuple[float, float, float]:
    """(wall seconds, seconds the store charges the reads: their shares of the busy time, summed
    per-read seconds: what it charged before `BusyTime`) to read every block back on ``readers`` threads."""
    busy = BusyTime()

    def job(index: int, key: bytes) -> tuple[tuple[int, ...] | None, float, float]:
        tick = time.perf_counter()
        read, share = read_job(tier, key, out[index], None, busy)
        return read, share, time.perf_counter() - tick

    with ThreadPoolExecutor(max_workers=readers) as pool:
        pool.submit(lambda: None).result()  # the threads exist before the clock starts
        tick = time.perf_counter()
        futures = [pool.submit(job, index, key) for index, key in enumerate(keys)]
        results = [future.result() for future in futures]
        wall = time.perf_counter() - tick
    for index, (read, _, _) in enumerate(results):
        if read != tokens[index]:
            raise SystemExit(f"block {index} read back wrong: {read is None and 'missing or corrupt'}")
    for key in keys:
        tier.read_done(key, True)
    return wall, sum(share for _, share, _ in results), sum(own for _, _, own in results)


def split(directory: Path, block: np.ndarray, path: Path) -> None:
    """The parts of one block's write and read, each timed alone on this thread."""
    nbytes = block.nbytes
    payload = block.reshape(-1).data
    out = np.empty_like(block)
    print("one block's parts (median of 5, this thread):")
    crc = timed(lambda: zlib.crc32(payload))
    print(f"  zlib.crc32                      {crc * 1e6:8.0f} us  {gbps(nbytes, crc)}")
    tier_crc32 = getattr(disk_module, "crc32", zlib.crc32)
    tier_crc = timed(lambda: tier_crc32(payload))
    print(f"  disk tier's crc32 ({crc_name():6s})      {tier_crc * 1e6:8.0f} us  {gbps(nbytes, tier_crc)}")
    copy = timed(lambda: np.copyto(out, block))
    print(f"  memcpy (np.copyto)              {copy * 1e6:8.0f} us  {gbps(nbytes, copy)}")

    def read_file() -> None:
        with open(path, "rb", buffering=0) as fh:
            fh.readinto(out.reshape(-1).data)

    read = timed(read_file)
    print(f"  open + readinto (page cache)    {read * 1e6:8.0f} us  {gbps(nbytes, read)}")
    write_variants(directory, payload)


def write_variants(directory: Path, payload: memoryview) -> None:
    """One block's file written the ways the disk tier could: a new file, a file truncated and
    rewritten, an existing file overwritten in place (recycled) with and without a rename after it,
    in place with the header written last (a second ``pwrite``), a new file preallocated first."""
    nbytes = len(payload)
    scratch, other = directory / "scratch.tmp", directory / "scratch.kvb"
    head, body = payload[:4096], payload[4096:]

    def write(path: Path, flags: int, parts: list[memoryview], fallocate: bool = False) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            if fallocate:
                os.posix_fallocate(fd, 0, nbytes)
            os.writev(fd, parts)
        finally:
            os.close(fd)

    def header_last() -> None:
        fd = os.open(scratch, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(64), 0)  # the old header invalidated
            os.pwrite(fd, body, len(head))
            os.pwrite(fd, head, 0)
        finally:
            os.close(fd)

    def unlinked() -> None:
        scratch.unlink(missing_ok=True)
        other.unlink(missing_ok=True)

    def existing() -> None:
        if not scratch.exists():
            write(scratch, os.O_TRUNC, [payload])

    def overwrite_and_rename() -> None:
        write(scratch, 0, [head, body])
        os.replace(scratch, other)

    def moved_back() -> None:
        if other.exists():
            os.replace(other, scratch)
        existing()

    def fresh() -> None:
        unlinked()
        existing()

    variants: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("new file + writev", lambda: write(scratch, os.O_TRUNC, [payload]), unlinked),
        ("new file, fallocate + writev", lambda: write(scratch, os.O_TRUNC, [payload], True), unlinked),
        ("truncate + rewrite", lambda: write(scratch, os.O_TRUNC, [payload]), existing),
        ("overwrite in place (writev)", lambda: write(scratch, 0, [head, body]), existing),
        ("overwrite in place + rename", overwrite_and_rename, moved_back),
        ("overwrite, header last (3 pwrite)", header_last, existing),
    ]
    for label, fn, setup in variants:
        seconds = timed(fn, repeat=9, setup=setup)
        print(f"  {label:34s}{seconds * 1e6:8.0f} us  {gbps(nbytes, seconds)}")
    rename = timed(lambda: os.replace(scratch, other), setup=fresh)
    print(f"  rename                          {rename * 1e6:8.0f} us")
    unlink = timed(scratch.unlink, setup=existing)
    print(f"  unlink                          {unlink * 1e6:8.0f} us")
    unlinked()


def one_pass(directory: Path, args: argparse.Namespace, recycle: bool) -> None:
    """Fill a tier of ``--capacity`` blocks, write the rest of ``--blocks`` into it full (evicting),
    read the blocks it holds back; GB/s of each phase."""
    disk_module.SPARE_FILES = SPARES if recycle else 0
    shape, capacity = SHAPES[args.shape], args.capacity or args.blocks
    tier = make_tier(directory, shape, capacity)
    block_bytes = tier.context.block_bytes
    print(f"-- recycle {'on' if recycle else 'off'}: {args.blocks} blocks of {args.shape} "
          f"({block_bytes / 1e6:.2f} MB each) into a tier of {tier.capacity}, checksum {crc_name()}, "
          f"{args.readers} reader thread(s), {os.cpu_count()} CPUs, {directory}")
    slab = torch.randint(0, 256, (tier.capacity, *shape), dtype=torch.uint8)
    tokens = [tuple(range(i * 16, i * 16 + 16)) for i in range(args.blocks)]
    keys = [chain_key(b"", t) for t in tokens]
    fill = min(tier.capacity, args.blocks)
    for label, first, last in (("fill (new files)", 0, fill), ("full (evicting)", fill, args.blocks)):
        if last <= first:
            continue
        with BusyEngine(args.busy):
            seconds = write_phase(tier, slab, keys[first:last], tokens[first:last], first)
        print(f"write  {label:17s} put_deferred + writer thread: {gbps((last - first) * block_bytes, seconds)}"
              f"  ({seconds:.3f} s, {last - first} blocks)")
    held = tier.keys()
    tick = time.perf_counter()
    os.sync()  # the dirty pages' writeback would share the CPUs with the reads
    print(f"  sync (writeback of the dirty pages): {time.perf_counter() - tick:.3f} s")
    out = np.empty((len(held), *shape), dtype=np.uint8)
    out.fill(1)  # touched, as the host slab is (a first touch of fresh memory would be timed otherwise)
    held_tokens = [tokens[keys.index(key)] for key in held]
    for readers in (args.readers, 1):
        with BusyEngine(args.busy):
            wall, charged, summed = read_phase(tier, out, held, held_tokens, readers)
        nbytes = len(held) * block_bytes
        print(f"read   read_job on {readers} thread(s):     {gbps(nbytes, wall)}  ({wall:.3f} s; "
              f"{summed / len(held) * 1e6:.0f} us a read); the store's load_bandwidth: {gbps(nbytes, charged)} "
              f"(busy time), {gbps(nbytes, summed)} (summed read time, before)")
    rows = [keys.index(key) % len(slab) for key in held]
    if not np.array_equal(out, slab.numpy()[rows]):
        raise SystemExit("the blocks read back differ from those written")
    tier.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    parser.add_argument("--readers", type=int, default=READERS)
    parser.add_argument("--checksum", choices=("tier", "zlib"), default="tier",
                        help="zlib: the tier checksums with zlib.crc32 (the speed before ISA-L) whatever is installed")
    parser.add_argument("--busy", action="store_true",
                        help="a thread runs Python throughout the writes and reads (a busy engine thread)")
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary directory)")
    parser.add_argument("--capacity", type=int, default=0,
                        help="blocks the tier holds (default --blocks: it never fills)")
    parser.add_argument("--recycle", default="on", help="on, off or a list such as on,off,on,off (one pass each)")
    parser.add_argument("--switch-ms", type=float, default=None,
                        help="the interpreter's switch interval (sys.setswitchinterval; default 5 ms): how long a "
                             "thread back from a system call may wait for the lock a busy thread holds")
    args = parser.parse_args()
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1e3)
    if args.checksum == "zlib":
        disk_module._crc32, disk_module.CRC_IMPL = zlib.crc32, "zlib"
    for mode in args.recycle.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir) as name:
            os.sync()  # the last pass's dirty pages are not this pass's work
            one_pass(Path(name), args, mode == "on")
    with tempfile.TemporaryDirectory(dir=args.dir) as name:
        block = torch.randint(0, 256, SHAPES[args.shape], dtype=torch.uint8).numpy()
        path = Path(name) / "block"
        path.write_bytes(block.tobytes())
        split(Path(name), block, path)


if __name__ == "__main__":
    main()
