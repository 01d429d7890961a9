"""Disk tier: one file per block under ``<disk_path>/<fingerprint>/``, each checked on every read.

A file is a header (magic, token count, payload length, CRC-32 of tokens and payload), the token
ids (int64) and the block's bytes. It is written to a temporary name and renamed, so a crash
leaves either the whole block or none. Writes run on one background thread (checksum and file
I/O release the GIL), so the engine step only copies the block's bytes; until its file exists a
block is served from that copy, and `close` waits for every write. A file whose size, checksum or
tokens do not match is deleted and reported as a miss (the block is recomputed). A failed write
(disk full, any ``OSError``) stores nothing and is logged; the engine carries on. The directory is
scanned at start-up: blocks a previous engine with the same fingerprint wrote are found again.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sagellm_core.kv.tiers.base import KVTier, TierBlock, TierContext

log = logging.getLogger("sagellm")
MAGIC = b"SGKVBLK2"
HEADER = struct.Struct("<8sIII")
SUFFIX = ".kvb"
LOG_EVERY = 1000
"""A full disk fails every write: the first failure is logged, then every LOG_EVERY-th."""


def encode_block(data: np.ndarray, token_ids: tuple[int, ...]) -> bytes:
    tokens = np.asarray(token_ids, dtype="<i8").tobytes()
    payload = data.tobytes()
    checksum = zlib.crc32(payload, zlib.crc32(tokens))
    return HEADER.pack(MAGIC, len(token_ids), len(payload), checksum) + tokens + payload


def decode_block(raw: bytearray, payload_bytes: int) -> tuple[memoryview, tuple[int, ...]] | None:
    """(payload, token ids) as views of ``raw``, or None when the bytes are not one intact block of
    ``payload_bytes``."""
    if len(raw) < HEADER.size:
        return None
    magic, num_tokens, length, checksum = HEADER.unpack_from(raw)
    body = memoryview(raw)[HEADER.size:]
    if magic != MAGIC or length != payload_bytes or len(body) != 8 * num_tokens + length:
        return None
    if zlib.crc32(body) != checksum:
        return None
    tokens = tuple(np.frombuffer(body[: 8 * num_tokens], dtype="<i8").tolist())
    return body[8 * num_tokens:], tokens


def read_file(path: Path) -> bytearray:
    with open(path, "rb") as fh:
        raw = bytearray(os.fstat(fh.fileno()).st_size)
        read = fh.readinto(raw)
    return raw[:read] if read != len(raw) else raw


class DiskTier(KVTier):
    """Least recently used files are deleted first once ``capacity_bytes`` is reached."""

    name = "disk"
    persistent = True

    def __init__(self, context: TierContext, root: str | os.PathLike[str], capacity_bytes: int) -> None:
        super().__init__(context)
        self.directory = Path(root) / context.fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file_bytes = HEADER.size + context.block_bytes + 8 * context.block_shape[2]
        self.capacity = max(1, capacity_bytes // self.file_bytes)
        self.files: OrderedDict[bytes, int] = OrderedDict()  # key -> file size, oldest use first
        self._pending: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}  # written on the thread, not yet on disk
        self._failed: list[bytes] = []  # the thread's failed writes, for the engine thread to forget
        self._cancel_lock = threading.Lock()
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
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                key = bytes.fromhex(name[: -len(SUFFIX)])
            except ValueError:
                continue
            stat = entry.stat()
            found.append((stat.st_mtime_ns, key, stat.st_size))
        for _, key, size in sorted(found):
            self.files[key] = size
        self.stats.num_blocks = len(self.files)
        self.stats.bytes = sum(self.files.values())

    def path(self, key: bytes) -> Path:
        return self.directory / (key.hex() + SUFFIX)

    def contains(self, key: bytes) -> bool:
        self._forget_failed()
        return key in self.files

    def touch(self, key: bytes) -> None:
        if key in self.files:
            self.files.move_to_end(key)

    def get(self, key: bytes) -> TierBlock | None:
        self._forget_failed()
        if key not in self.files:
            return None
        pending = self._pending.get(key)
        if pending is not None:
            self.files.move_to_end(key)
            payload_bytes, tokens = pending
            return TierBlock(torch.frombuffer(bytearray(payload_bytes), dtype=torch.uint8).view(self.context.block_shape),
                             tokens)
        try:
            raw = read_file(self.path(key))
        except OSError as exc:
            log.warning("KV disk tier: cannot read %s: %s", self.path(key), exc)
            raw = bytearray()
        decoded = decode_block(raw, self.context.block_bytes)
        if decoded is None:
            log.warning("KV disk tier: %s is truncated or corrupt; deleted (the block is recomputed)",
                        self.path(key))
            self.stats.errors += 1
            self.evict(key)
            return None
        payload, tokens = decoded
        self.files.move_to_end(key)
        data = torch.frombuffer(payload, dtype=torch.uint8).view(self.context.block_shape)
        return TierBlock(data, tokens)

    def has_room(self) -> bool:
        self._forget_failed()
        return len(self.files) < self.capacity

    def put(self, key: bytes, data: torch.Tensor, token_ids: tuple[int, ...]) -> bool:
        """Queue the block's file; True when it is stored or queued (a failed write is forgotten later)."""
        self._forget_failed()
        if key in self.files:
            self.files.move_to_end(key)
            return True
        payload = data.cpu().numpy().tobytes()  # a copy: the caller may reuse ``data`` at once
        self._pending[key] = (payload, token_ids)
        size = HEADER.size + 8 * len(token_ids) + len(payload)
        self.files[key] = size
        self.stats.stores += 1
        self.stats.bytes += size
        self.stats.num_blocks = len(self.files)
        self._writer.submit(self._write, key, payload, token_ids)
        return True

    def _write(self, key: bytes, payload: bytes, token_ids: tuple[int, ...]) -> None:
        """The writer thread: one block's file, written to a temporary name and renamed."""
        raw = encode_block(np.frombuffer(payload, dtype=np.uint8), token_ids)
        target = self.path(key)
        temporary = target.with_name(target.name + f".{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as fh:
                fh.write(raw)
            with self._cancel_lock:
                if key in self._pending:
                    os.replace(temporary, target)
                else:  # evicted while it was being written
                    temporary.unlink(missing_ok=True)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            self._failed.append(key)
            if len(self._failed) % LOG_EVERY == 1:
                log.warning("KV disk tier: cannot write %s (%s); the block is not stored", target, exc)
        finally:
            self._pending.pop(key, None)

    def _forget_failed(self) -> None:
        while self._failed:
            key = self._failed.pop()
            self.stats.errors += 1
            size = self.files.pop(key, None)
            if size is not None:
                self.stats.bytes -= size
                self.stats.num_blocks = len(self.files)

    def ready(self) -> None:
        """Wait until every queued block is on disk (or has failed)."""
        self._writer.submit(lambda: None).result()
        self._forget_failed()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._forget_failed()

    def keys(self) -> list[bytes]:
        return list(self.files)

    def victim(self) -> bytes | None:
        return next(iter(self.files), None)

    def evict(self, key: bytes) -> None:
        size = self.files.pop(key, None)
        if size is not None:
            with self._cancel_lock:
                self._pending.pop(key, None)  # a queued write then leaves no file
                self.path(key).unlink(missing_ok=True)
            self.stats.evictions += 1
            self.stats.bytes -= size
            self.stats.num_blocks = len(self.files)
