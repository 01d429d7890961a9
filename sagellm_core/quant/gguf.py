"""GGUF quantized tensors as `QuantizedWeight`s, read from the file's own blocks (no de-quantizing).

Q8_0 (per 32 weights: fp16 ``d``, 32 int8 ``q``; ``w = d*q``) becomes ``int8``: the aten int8 kernel
takes one scale per output channel, so its blocks are re-scaled per channel (|error| <= half a code
step of the row's scale). Q4_0 (``d``, 32 nibbles; ``w = d*(q-8)``) and Q4_1 (``d``, ``m``, 32 nibbles;
``w = d*q + m``) become ``int4`` groups of 32 exactly. Names follow llama.cpp's Llama layout
(``blk.N.attn_q`` ...); q/k rows are un-permuted as transformers' GGUF loader does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sagellm_core.quant.weights import QuantizedWeight, quantize_int8

BLOCK = 32
GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SUPPORTED_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def hf_linear_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj``; ``output`` -> ``lm_head``."""
    parts = gguf_name.split(".")
    if parts[-1] != "weight":
        return None
    if parts[:-1] == ["output"]:
        return "lm_head"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}"
    return None


def _unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' ``reverse_permute_weights``)."""
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).swapaxes(2, 1).reshape(num_rows)


def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    rows = data.shape[0]
    return np.ascontiguousarray(data).reshape(rows, -1, block_bytes)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: the low nibbles are weights 0-15, the high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_tensor(type_name: str, data: np.ndarray) -> QuantizedWeight:
    """One GGUF tensor's raw blocks [N, bytes] -> `QuantizedWeight` (see the module docstring)."""
    if type_name == "Q8_0":
        blocks = _blocks(data, 34)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        weight = torch.from_numpy((q * d[..., None]).reshape(data.shape[0], -1))
        return quantize_int8(weight)
    if type_name == "Q4_1":
        blocks = _blocks(data, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = _nibbles(blocks[..., 4:])
        offsets = m
    elif type_name == "Q4_0":
        blocks = _blocks(data, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = _nibbles(blocks[..., 2:])
        offsets = -8.0 * d
    else:
        raise ValueError(f"GGUF tensor type {type_name} is not one of {', '.join(SUPPORTED_TYPES)}")
    rows = data.shape[0]
    return QuantizedWeight("int4", torch.from_numpy(codes.reshape(rows, -1).astype(np.uint8)),
                           torch.from_numpy(d), torch.from_numpy(np.asarray(offsets, dtype=np.float32)), BLOCK)


def _take_rows(qw: QuantizedWeight, order: np.ndarray) -> QuantizedWeight:
    index = torch.from_numpy(order)
    return QuantizedWeight(qw.kind, qw.codes[index], qw.scales[index],
                           None if qw.offsets is None else qw.offsets[index], qw.group_size, qw.bias)


def read_quantized_linears(path: Path, num_heads: int, num_kv_heads: int, only: set[str] | None = None
                           ) -> dict[str, QuantizedWeight]:
    """The linear weights of a Llama-layout GGUF stored as Q8_0 / Q4_0 / Q4_1, keyed by HF module name.

    A file without an ``output`` tensor ties the LM head to ``token_embd``; that tensor is returned
    as ``lm_head`` too (the embedding itself stays a float lookup table). Other tensor types are
    left out (their layers keep the de-quantized float weights). ``only``: just these HF names.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    found: dict[str, QuantizedWeight] = {}
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        name = "lm_head" if tensor.name == "token_embd.weight" and not has_output else hf_linear_name(tensor.name)
        if name is None or type_name not in SUPPORTED_TYPES or (only is not None and name not in only):
            continue
        qw = decode_tensor(type_name, np.asarray(tensor.data))
        if name.endswith("self_attn.q_proj"):
            qw = _take_rows(qw, _unpermute_rows(qw.out_features, num_heads))
        elif name.endswith("self_attn.k_proj"):
            qw = _take_rows(qw, _unpermute_rows(qw.out_features, num_kv_heads))
        found[name] = qw
    return found


def quantized_tensor_types(path: Path) -> set[str]:
    """The supported quantized types (Q8_0, Q4_0, Q4_1) that occur in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.tensor_type.name for t in reader.tensors} & set(SUPPORTED_TYPES)
