"""Disk tier: one file per block under ``<disk_path>/<fingerprint>/``, each checked on every read.

A file is a header (magic, token count, payload length, CRC-32 of key, tokens and payload, the
block's key), the token ids (int64) and the block's bytes. It is written under another name and
renamed, so a block's name only ever holds a whole file (a crash before the rename leaves a file no
block is read from; after it, a page the kernel had not written back fails the checksum). Evicted
files are recycled: renamed to a spare name (``*.spare``, at most `SPARE_FILES`, kept across
restarts) and overwritten in place by the next block, then renamed to its name: an overwrite of a
cached file's pages runs at memory speed, where a new file's pages must be allocated (and an unlink
freed them). A spare whose last block a reader may still be reading is not reused until the read
ended, and a file's header names its key, so a reader never takes another block's bytes for its own.

Everything about a write (waiting for the block's copy to host memory, the checksum, the file I/O,
recycling evicted files) runs on one background thread; the engine step only hands over a reference
to the block's host bytes (`put_deferred`: a slot of the host slab, released when the file is
written). Reads run on reader threads (`read_into`: the file straight into a host slot, then its
checksum; a block still queued for its file is copied from its host bytes, never waited for), and
the engine thread does the bookkeeping (`read_done`). A file whose size, checksum, key or tokens do
not match is recycled and reported as a miss (the block is recomputed). A failed write (disk full,
any ``OSError``) stores nothing and is logged; the engine carries on. The directory is scanned at
start-up: blocks a previous engine with the same fingerprint wrote are found again.
"""

from __future__ import annotations

import logging
import itertools
import os
import secrets
import struct
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sagellm_core.kv.tiers.base import KEY_BYTES, KVTier, TierBlock, TierContext

try:  # ISA-L's CRC-32 (the same polynomial as zlib's: files stay readable either way), ~15x faster
    from isal.isal_zlib import crc32 as _crc32

    CRC_IMPL = "isal"
except ImportError:  # pragma: no cover - isal is a dependency; a bare install still works, slower
    _crc32 = zlib.crc32
    CRC_IMPL = "zlib"

log = logging.getLogger("sagellm")
MAGIC = b"SGKVBLK3"
HEADER = struct.Struct(f"<8sIII{KEY_BYTES}s")
NO_KEY = bytes(KEY_BYTES)
SUFFIX = ".kvb"
SPARE_SUFFIX = ".spare"
SPARE_FILES = 16
"""Evicted files kept for the next blocks to overwrite (beyond them, evicted files are deleted):
the disk holds up to this many files more than the tier's capacity."""
LOG_EVERY = 1000
"""A full disk fails every write: the first failure is logged, then every LOG_EVERY-th."""


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 of ``data`` (a bytes-like object) continuing from ``value``: zlib's checksum, computed
    by ISA-L when it is installed (several times faster than zlib: a block's checksum no longer
    bounds the disk tier's read and write rate)."""
    return int(_crc32(data, value))


def encode_header(payload: memoryview, token_ids: tuple[int, ...], key: bytes = NO_KEY) -> bytes:
    """The header and token ids that precede ``payload`` in the file of block ``key`` (the checksum
    covers key, tokens and payload)."""
    tokens = np.asarray(token_ids, dtype="<i8").tobytes()
    checksum = crc32(payload, crc32(tokens, crc32(key)))
    return HEADER.pack(MAGIC, len(token_ids), len(payload), checksum, key) + tokens


def encode_block(data: np.ndarray, token_ids: tuple[int, ...], key: bytes = NO_KEY) -> bytes:
    """A whole block's file as bytes (tests and tools; the writer streams header and payload)."""
    payload = np.ascontiguousarray(data).reshape(-1).data
    return encode_header(payload, token_ids, key) + payload.tobytes()


class _Pending:
    """A block queued for its file: host ``data`` (valid until `release`), its tokens and the event
    its copy to host memory records (None: ready)."""

    def __init__(self, data: torch.Tensor, token_ids: tuple[int, ...], ready: Any,
                 release: Callable[[], None]) -> None:
        self.data = data
        self.token_ids = token_ids
        self.ready = ready
        self._release = release
        self._released = False
        self._lock = threading.Lock()

    def copy_to(self, out: np.ndarray) -> tuple[int, ...] | None:
        """Any thread: the block's host bytes into ``out`` and its tokens, or None once released."""
        with self._lock:  # `release` waits for the copy
            if self._released:
                return None
            if self.ready is not None:
                self.ready.synchronize()
            np.copyto(out.reshape(-1), self.data.numpy().reshape(-1))
            return self.token_ids

    def release(self) -> None:
        """The writer is done with ``data``: no copy reads it any more, its owner may reuse it."""
        with self._lock:
            self._released = True
        self._release()


class _Spare:
    """An evicted block's file under a spare name, to be overwritten by a later block; ``origin``:
    the key whose file it was (None: found at start-up); ``size``: its bytes."""

    def __init__(self, path: Path, origin: bytes | None, size: int) -> None:
        self.path = path
        self.origin = origin
        self.size = size


class DiskTier(KVTier):
    """Least recently used files are recycled first once ``capacity_bytes`` is reached."""

    name = "disk"
    persistent = True
    thread_safe_reads = True

    def __init__(self, context: TierContext, root: str | os.PathLike[str], capacity_bytes: int) -> None:
        super().__init__(context)
        self.directory = Path(root) / context.fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file_bytes = HEADER.size + context.block_bytes + 8 * context.block_shape[2]
        self.capacity = max(1, capacity_bytes // self.file_bytes)
        self.files: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest use first
        self._pending: dict[bytes, _Pending] = {}  # queued or being written on the writer thread
        self._failed: list[bytes] = []  # the thread's failed writes, for the engine thread to forget
        self._spares: list[_Spare] = []  # the writer thread's
        self._reading: dict[bytes, int] = {}  # key -> reads of its file in flight
        self._spare_names = secrets.token_hex(8)  # this engine's spare names: <names>-<count>.spare
        self._spare_count = itertools.count()
        self._cancel_lock = threading.Lock()  # guards _pending's removals, _reading, and renames onto a key
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sagellm-kv-disk")
        self._scan()
        self.stats.capacity_blocks = self.capacity
        self.stats.capacity_bytes = capacity_bytes

    def _scan(self) -> None:
        found = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(".tmp"):
                os.unlink(entry.path)  # a write that did not finish
            elif name.endswith(SPARE_SUFFIX):
                self._keep_spare(_Spare(Path(entry.path), None, entry.stat().st_size))
            elif name.endswith(SUFFIX):
                key = key_of(name)
                if key is not None:
                    stat = entry.stat()
                    found.append((stat.st_mtime_ns, key, stat.st_size))
        for _, key, size in sorted(found):
            self.files[key] = size
        self.stats.num_blocks = len(self.files)
        self.stats.bytes = sum(self.files.values())

    def path(self, key: bytes) -> Path:
        """The file of block ``key``."""
        return self.directory / (key.hex() + SUFFIX)

    def spare_count(self) -> int:
        """Evicted files kept for reuse (the writer thread's pool; tests and tools)."""
        return len(self._spares)

    # ---- lookups -------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        self._forget_failed()
        return key in self.files

    def touch(self, key: bytes) -> None:
        if key in self.files:
            self.files.move_to_end(key)

    def get(self, key: bytes) -> TierBlock | None:
        """The block on the engine thread (a copy; generic paths: shutdown, plugin tiers below)."""
        if not self.contains(key):
            return None
        out = np.empty(self.context.block_bytes, dtype=np.uint8)
        tokens = self.read_into(key, out)
        self.read_done(key, tokens is not None)
        if tokens is None:
            return None
        return TierBlock(torch.from_numpy(out).view(self.context.block_shape), tokens)

    def read_into(self, key: bytes, out: np.ndarray) -> tuple[int, ...] | None:
        """Any thread: block ``key`` into ``out``, from its host bytes while it is queued for its file
        (a read never waits behind the writer's queue), else from its file; its tokens, or None when
        it is missing, truncated, corrupt or another block's."""
        pending = self._pending.get(key)
        if pending is not None:
            tokens = pending.copy_to(out)
            if tokens is not None:
                return tokens
        with self._cancel_lock:  # its file is not recycled while this read may still see it
            self._reading[key] = self._reading.get(key, 0) + 1
        try:
            return read_block(self.path(key), out.reshape(-1).data, self.context.block_shape[2], key)
        except OSError:
            return None
        finally:
            with self._cancel_lock:
                count = self._reading.pop(key) - 1
                if count:
                    self._reading[key] = count

    def read_done(self, key: bytes, ok: bool) -> None:
        """The engine thread: a hit is used recently; a failed read's file is deleted (its size may
        be anything: it is not recycled)."""
        if ok:
            self.touch(key)
            return
        if key in self.files:
            log.warning("KV disk tier: %s is missing, truncated or corrupt; dropped (the block is recomputed)",
                        self.path(key))
            self.stats.errors += 1
            self._evict(key, recycle=False)

    # ---- writes --------------------------------------------------------------------------------
    def has_room(self) -> bool:
        self._forget_failed()
        return len(self.files) < self.capacity

    def put(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> bool:
        """Queue a copy of the block's file (the caller may reuse ``data`` at once)."""
        copy = data.detach().to("cpu", copy=True).contiguous()
        return self.put_deferred(key, copy, token_ids, None, lambda: None)

    def put_deferred(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...], ready: Any,
                     release: Callable[[], None]) -> bool:
        """Queue the block's file, written from ``data`` on the writer thread, which then calls
        ``release``; True when it is stored or queued (a failed write is forgotten later)."""
        self._forget_failed()
        if key in self.files:
            self.files.move_to_end(key)
            release()
            return True
        pending = _Pending(data, token_ids, ready, release)
        self._pending[key] = pending
        size = HEADER.size + 8 * len(token_ids) + self.context.block_bytes
        self.files[key] = size
        self.stats.stores += 1
        self.stats.bytes += size
        self.stats.num_blocks = len(self.files)
        self._writer.submit(self._write, key, pending)
        return True

    def _write(self, key: bytes, pending: _Pending) -> None:
        """The writer thread: one block's file (unless it was evicted before its turn), then its host
        bytes are released."""
        try:
            if self._pending.get(key) is pending:
                self._write_file(key, pending)
        except OSError as exc:
            self._failed.append(key)
            if len(self._failed) % LOG_EVERY == 1:
                log.warning("KV disk tier: cannot write %s (%s); the block is not stored", self.path(key), exc)
        finally:
            with self._cancel_lock:
                if self._pending.get(key) is pending:
                    del self._pending[key]
            pending.release()

    def _write_file(self, key: bytes, pending: _Pending) -> None:
        """Write the block's file under a spare's name (overwriting an evicted block's file) or a
        temporary one, then rename it to the block's (unless evicted meanwhile)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        payload = pending.data.numpy().reshape(-1).data
        header = encode_header(payload, pending.token_ids, key)
        target = self.path(key)
        spare = self._take_spare()
        temporary = target.with_name(target.name + f".{os.getpid()}.tmp") if spare is None else spare.path
        try:
            write_file(temporary, [header, payload], None if spare is None else spare.size)
            if spare is not None:
                spare.size = len(header) + len(payload)  # cut or grown to it
            with self._cancel_lock:
                placed = self._pending.get(key) is pending
                if placed:
                    os.replace(temporary, target)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        if not placed:  # evicted while it was being written
            self._give_up(temporary, spare)

    def _take_spare(self) -> _Spare | None:
        """The writer thread: a spare file no read may still see as its block's (None: none)."""
        with self._cancel_lock:
            for index, spare in enumerate(self._spares):
                if spare.origin is None or spare.origin not in self._reading:
                    return self._spares.pop(index)
        return None

    def _give_up(self, path: Path, spare: _Spare | None) -> None:
        """A written file no block needs: back to the spares (or deleted, as a temporary file is)."""
        if spare is not None:
            self._keep_spare(spare)
        else:
            path.unlink(missing_ok=True)

    def _keep_spare(self, spare: _Spare) -> None:
        """Pool ``spare`` for a later block's file (deleted when `SPARE_FILES` are pooled)."""
        if len(self._spares) < SPARE_FILES:
            self._spares.append(spare)
        else:
            spare.path.unlink(missing_ok=True)

    def _forget_failed(self) -> None:
        while self._failed:
            key = self._failed.pop()
            self.stats.errors += 1
            if key in self._pending:
                continue  # queued again since: that write decides
            size = self.files.pop(key, None)
            if size is not None:
                self.stats.bytes -= size
                self.stats.num_blocks = len(self.files)

    def ready(self) -> None:
        """Wait until every queued block is on disk (or has failed)."""
        self._writer.submit(lambda: None).result()
        self._forget_failed()

    def close(self) -> None:
        """Finish the queued writes (files and spares stay on disk for the next engine)."""
        self._writer.shutdown(wait=True)
        self._forget_failed()

    def keys(self) -> list[bytes]:
        return list(self.files)

    def victim(self) -> bytes | None:
        return next(iter(self.files), None)

    def evict(self, key: bytes) -> None:
        """Forget ``key`` now; its file becomes a spare on the writer thread (after any queued write)."""
        self._evict(key, recycle=True)

    def _evict(self, key: bytes, recycle: bool) -> None:
        size = self.files.pop(key, None)
        if size is not None:
            with self._cancel_lock:
                self._pending.pop(key, None)  # a queued write then leaves no file
            self._writer.submit(self._retire, key, size if recycle else None)
            self.stats.evictions += 1
            self.stats.bytes -= size
            self.stats.num_blocks = len(self.files)

    def _retire(self, key: bytes, size: int | None) -> None:
        """The writer thread: an evicted block's file of ``size`` bytes is renamed to a spare name
        (unless the block was stored again since), pooled or deleted (``size`` None: deleted)."""
        spare = _Spare(self.directory / f"{self._spare_names}-{next(self._spare_count)}{SPARE_SUFFIX}", key, size or 0)
        with self._cancel_lock:
            if key in self._pending:
                return
            if size is None:
                self.path(key).unlink(missing_ok=True)
                return
            try:
                os.rename(self.path(key), spare.path)
            except FileNotFoundError:
                return  # its write failed or never ran
        self._keep_spare(spare)


def key_of(name: str) -> bytes | None:
    """The key of a block file's name, or None when it names none."""
    try:
        key = bytes.fromhex(name[: -len(SUFFIX)])
    except ValueError:
        return None
    return key if len(key) == KEY_BYTES else None


def write_file(path: Path, parts: list[Any], recycled: int | None = None) -> None:
    """Write ``parts`` (bytes-like) as the file ``path`` in one ``writev`` (more only after a short
    write): each system call is a point where a background thread gives the interpreter lock up and
    may wait a switch interval to take it back from a busy engine thread. ``recycled``: the size of
    ``path``, an existing file overwritten in place (its cached pages reused), then cut to the
    parts' length if it was longer; None: a new file."""
    views = [memoryview(part).cast("B") for part in parts]
    total = sum(len(view) for view in views)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if recycled is None else 0), 0o644)
    try:
        while views:
            written = os.writev(fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][written:]
        if recycled is not None and recycled > total:
            os.ftruncate(fd, total)
    finally:
        os.close(fd)


def read_block(path: Path, out: memoryview, num_tokens: int | None = None,
               key: bytes | None = None) -> tuple[int, ...] | None:
    """Read one block's file into ``out`` (its payload bytes); its token ids, or None when the file
    is not one intact block of ``len(out)`` bytes (of ``key``, when given). ``num_tokens``: the count
    the file most likely holds (a full block's): then header, tokens and payload come in one
    ``preadv`` (a file of another count is read again with its own)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if num_tokens is None:
            num_tokens = max(0, (os.fstat(fd).st_size - HEADER.size - len(out)) // 8)
        head, beyond = bytearray(HEADER.size + 8 * num_tokens), bytearray(1)
        count = os.preadv(fd, [head, out, beyond], 0)
    finally:
        os.close(fd)
    if count < HEADER.size:
        return None
    magic, file_tokens, length, checksum, file_key = HEADER.unpack_from(head)
    if magic != MAGIC or length != len(out) or (key is not None and file_key != key):
        return None
    if file_tokens != num_tokens:  # fewer tokens than a full block (tests, tools): read with its count
        return read_block(path, out, file_tokens, key) if file_tokens < num_tokens else None
    if count != len(head) + length:  # short, or longer than one block
        return None
    tokens = bytes(head[HEADER.size:])
    if crc32(out, crc32(tokens, crc32(file_key))) != checksum:
        return None
    return tuple(np.frombuffer(tokens, dtype="<i8").tolist())
