"""The identity of a KV cache's contents across restarts: model weights, dtypes, block size, layout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json")


def weights_signature(path: Path | None) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the weight and config files of a model directory (or one file)."""
    if path is None or not path.exists():
        return []
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    signature = []
    for file in files:
        stat = os.stat(file)
        signature.append((file.name, stat.st_size, stat.st_mtime_ns))
    return signature


def kv_fingerprint(weights: list[tuple[str, int, int]], **layout: Any) -> str:
    """A hex digest of the weights' signature and the KV layout (``dtype``, ``kv_dtype``,
    ``block_size``, ``num_layers``, ``num_kv_heads``, ``head_dim``, ``quantization``, ...): blocks
    written under one fingerprint are only ever read back under the same one."""
    text = json.dumps({"weights": weights, **{k: str(v) for k, v in sorted(layout.items())}}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
