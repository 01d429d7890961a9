"""Deciding the quantization of a loaded model and swapping its linear layers.

`resolve_method` turns ``model.quantization`` into what runs: ``auto`` is the GGUF's own quantization
(``gguf``) for a GGUF model on the CPU backend with ``dtype: auto``, else ``none``. `quantize_model`
replaces each ``torch.nn.Linear`` by the backend's quantized module (`Backend.quantized_linear`), or,
where the backend has none for that format or shape, by a plain Linear holding the de-quantized weight
(same numerics, no saving: the fallback vendor plugins use).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import torch

from sagellm_core.errors import ConfigError
from sagellm_core.quant.weights import QuantizedWeight, quantize

log = logging.getLogger("sagellm")
LM_HEAD = "lm_head"


@attrs.frozen
class QuantizationReport:
    """What `quantize_model` did: the method and, per (format, implementation), how many layers."""

    method: str
    layers: dict[str, int] = attrs.field(factory=dict)

    def summary(self) -> str:
        if self.method == "none":
            return "none"
        return f"{self.method}: " + ", ".join(f"{n} x {k}" for k, n in sorted(self.layers.items()))


def resolve_method(requested: str, dtype_setting: str, device_type: str, gguf_path: Path | None,
                   load_format: str = "auto") -> str:
    """``none``, ``gguf``, ``int8``, ``int4`` or ``fp8`` for the ``model.quantization`` setting."""
    if requested != "auto":
        return requested
    if gguf_path is None or device_type != "cpu" or dtype_setting != "auto" or load_format == "dummy":
        return "none"
    from sagellm_core.quant.gguf import quantized_tensor_types

    return "gguf" if quantized_tensor_types(gguf_path) else "none"


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _target_kind(method: str, name: str) -> str:
    """int4 keeps the LM head at int8 (as llama.cpp keeps its output tensor at higher precision)."""
    if method == "int4" and name == LM_HEAD:
        return "int8"
    return method


def _planned_weights(model: torch.nn.Module, method: str, gguf_path: Path | None
                     ) -> dict[str, QuantizedWeight | str]:
    """Per Linear name: a ready `QuantizedWeight` (from the GGUF's blocks) or the format to quantize to."""
    plan: dict[str, QuantizedWeight | str] = {}
    from_file: dict[str, QuantizedWeight] = {}
    if method in ("gguf", "int4") and gguf_path is not None:
        from sagellm_core.quant.gguf import read_quantized_linears

        config = _text_config(model)
        heads = config.num_attention_heads
        from_file = read_quantized_linears(gguf_path, heads, getattr(config, "num_key_value_heads", None) or heads)
    for name, linear in _linears(model):
        if method == "fp8" and name == LM_HEAD:
            continue  # the LM head stays in the model dtype (vLLM's convention for FP8)
        qw = from_file.get(name)
        if qw is not None and (method == "gguf" or qw.kind == _target_kind(method, name)):
            plan[name] = _with_bias(qw, linear)
        elif method != "gguf":
            plan[name] = _target_kind(method, name)
    return plan


def _with_bias(qw: QuantizedWeight, linear: torch.nn.Linear) -> QuantizedWeight:
    if tuple(qw.codes.shape) != tuple(linear.weight.shape):
        raise ConfigError(f"model.quantization: GGUF tensor for a {tuple(linear.weight.shape)} layer has shape "
                          f"{tuple(qw.codes.shape)}")
    bias = None if linear.bias is None else linear.bias.detach()
    return attrs.evolve(qw, bias=bias)


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def dequantized_linear(qw: QuantizedWeight, dtype: torch.dtype, device: torch.device) -> torch.nn.Linear:
    """The fallback: a plain Linear whose weight is the de-quantized one (in ``dtype``)."""
    linear = torch.nn.Linear(qw.in_features, qw.out_features, bias=qw.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(qw.dequantize().to(device=device, dtype=dtype), requires_grad=False)
    if qw.bias is not None:
        linear.bias = torch.nn.Parameter(qw.bias.to(device=device, dtype=dtype), requires_grad=False)
    return linear


def quantize_model(model: torch.nn.Module, method: str, backend: Any, dtype: torch.dtype,
                   gguf_path: Path | None = None) -> QuantizationReport:
    """Swap ``model``'s Linear layers for ``method`` (see `resolve_method`); returns what was done."""
    if method == "none":
        return QuantizationReport("none")
    if method == "gguf" and gguf_path is None:
        raise ConfigError("model.quantization: gguf needs a GGUF model file")
    device = backend.device()
    layers: Counter[str] = Counter()
    factories: dict[str, Any] = {}
    with torch.no_grad():
        for name, target in _planned_weights(model, method, gguf_path).items():
            linear = model.get_submodule(name)
            weight: torch.Tensor = linear.weight  # type: ignore[assignment]
            bias: torch.Tensor | None = linear.bias  # type: ignore[assignment]
            qw = quantize(target, weight, bias) if isinstance(target, str) else target
            if qw.kind not in factories:
                factories[qw.kind] = backend.quantized_linear(qw.kind)
            factory = factories[qw.kind]
            module = factory(_to_device(qw, device), dtype) if factory is not None else None
            if module is None:
                module = dequantized_linear(qw, dtype, device)
                layers[f"{qw.kind} (de-quantized)"] += 1
            else:
                layers[qw.kind] += 1
            _set_module(model, name, module)
    if hasattr(model.config, "tie_word_embeddings") and LM_HEAD in dict(model.named_children()):
        model.config.tie_word_embeddings = False  # the head is now its own (quantized) module
    report = QuantizationReport(method, dict(layers))
    log.info("quantization %s", report.summary())
    return report


def _to_device(qw: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return QuantizedWeight(qw.kind, qw.codes.to(device), qw.scales.to(device), move(qw.offsets), qw.group_size,
                           move(qw.bias))


def quantize_loaded_model(model: torch.nn.Module, model_config: Any, backend: Any, dtype: torch.dtype,
                          source: Any) -> QuantizationReport:
    """`resolve_method` on a `ModelConfig`, then `quantize_model` (the engine's one call). A
    compressed-tensors FP8 checkpoint (loaded de-quantized) runs as ``fp8`` under ``auto`` where the
    backend has an FP8 GEMM. ``source``: the `sagellm_core.models.loader.ModelSource` loaded."""
    from sagellm_core.quant.compressed import checkpoint_quantization_config, is_fp8

    gguf_path = source.gguf_path
    method = resolve_method(model_config.quantization, model_config.dtype, backend.device_type, gguf_path,
                            model_config.load_format)
    if (model_config.quantization == "auto" and model_config.load_format != "dummy"
            and is_fp8(checkpoint_quantization_config(source.directory))
            and backend.quantized_linear("fp8") is not None):
        method = "fp8"
    return quantize_model(model, method, backend, dtype, gguf_path)


def kv_cache_dtype(setting: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for ``kv_cache.dtype`` (``auto``: the model's)."""
    if setting == "fp8":
        return torch.float8_e4m3fn
    if setting == "auto":
        return model_dtype
    raise ConfigError(f"kv_cache.dtype: must be one of auto, fp8; got {setting!r}")
