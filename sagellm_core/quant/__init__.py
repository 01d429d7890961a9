"""Quantized weights: formats (`weights`), CPU weight-only kernels (`cpu_linear`), GGUF blocks
(`gguf`), FP8 checkpoints in the compressed-tensors format (`compressed`), and applying a method to a
loaded model (`apply`)."""

from sagellm_core.quant.apply import (
    QuantizationReport,
    dequantized_linear,
    kv_cache_dtype,
    quantize_loaded_model,
    quantize_model,
    resolve_method,
)
from sagellm_core.quant.weights import KINDS, LinearFactory, QuantizedWeight, quantize

__all__ = ["KINDS", "LinearFactory", "QuantizationReport", "QuantizedWeight", "dequantized_linear", "kv_cache_dtype", "quantize", "quantize_loaded_model",
           "quantize_model", "resolve_method"]
