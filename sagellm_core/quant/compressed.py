"""Pre-quantized checkpoints in the compressed-tensors format (what vLLM users publish, e.g. FP8
"float-quantized" Llama checkpoints): transformers' compressed-tensors integration reads them, and
de-quantizes the weights at load (``dequantize=True``). An FP8 checkpoint then runs in FP8 again
on a backend with an FP8 GEMM (`resolve_checkpoint_method`): its per-channel weights re-quantize to
the same E4M3 codes (a row's largest code is 448 again), per-tensor ones to per-channel codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUANT_METHOD = "compressed-tensors"


def _as_dict(quantization_config: Any) -> dict[str, Any]:
    if quantization_config is None:
        return {}
    if isinstance(quantization_config, dict):
        return quantization_config
    to_dict = getattr(quantization_config, "to_dict", None)
    return to_dict() if callable(to_dict) else {}


def is_compressed_tensors(quantization_config: Any) -> bool:
    return _as_dict(quantization_config).get("quant_method") == QUANT_METHOD


def is_fp8(quantization_config: Any) -> bool:
    """True for a compressed-tensors config whose every weight group is 8-bit float (FP8 E4M3)."""
    config = _as_dict(quantization_config)
    if config.get("quant_method") != QUANT_METHOD:
        return False
    groups = (config.get("config_groups") or {}).values()
    if not groups:
        return False
    return all((g.get("weights") or {}).get("type") == "float" and (g.get("weights") or {}).get("num_bits") == 8
               for g in groups)


def checkpoint_quantization_config(directory: Path) -> dict[str, Any]:
    """The ``quantization_config`` of a checkpoint directory's config.json ({} when none)."""
    path = directory / "config.json"
    if not path.is_file():
        return {}
    try:
        return _as_dict(json.loads(path.read_text(encoding="utf-8")).get("quantization_config"))
    except (OSError, ValueError):
        return {}


def load_kwargs(directory: Path) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: de-quantize a compressed-tensors checkpoint at load."""
    if not is_compressed_tensors(checkpoint_quantization_config(directory)):
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
