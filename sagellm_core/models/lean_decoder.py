"""A lean forward pass for Llama-style decoders (Llama, Mistral, Qwen2, Qwen3; `lean_support`) that
computes what transformers' modules compute, op for op, without their per-module Python overhead.

On the CPU a batch-1 decode step of a small model is mostly host time: transformers' module calls,
keyword plumbing, mask construction and per-projection casts cost more than the GEMMs. This forward
reads the same weights and runs the same torch ops in the same order on the flattened [T, hidden]
step (the model's [1, T, ...] layout without the batch axis), calls the backend's attention op
directly, and fuses projections of one input (q/k/v, gate/up) into one weight-only GEMM where that is
bit-identical (`lean_projection`). These rewrites keep every bit:

* RMSNorm's ``pow(2).mean(-1)`` is ``(x * x).sum(-1).div_(width)`` (what torch computes for the
  exponent 2 and for a float32 mean on the CPU), its constants are float32 0-dim tensors (the value a
  Python float becomes inside the op) and its temporaries are updated in place;
* the residual sums after o_proj and down_proj take the weight-only kernel's bf16 output as it is
  (the sum converts it to float32 exactly, as the module's cast did);
* the rotary embedding ``q * cos + rotate_half(q) * sin`` is computed as
  ``q * cos + roll(q) * sin_signed`` with ``sin_signed`` the sine with its first half negated (a
  product's sign is the XOR of its factors' signs; the magnitude is the same);
* q and k share one rotary pass when they are adjacent columns of one fused GEMM output.

Models it does not cover exactly are refused by `lean_support.lean_refusal` and keep the HF path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.models.lean_projection import Projections, projection
from sagellm_core.models.lean_support import Family, family_of, lean_refusal


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalise in float32, scale in the input dtype. ``eps`` and
    ``width`` (the normalised size) are 0-dim float32 tensors: the values Python numbers become
    inside the ops, without converting them on every call."""
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    # mean(h ** 2) as torch computes it on the CPU: x * x for the exponent 2, a sum, a true division
    h = h * (h * h).sum(-1, keepdim=True).div_(width).add_(eps).rsqrt_()
    return weight * (h if dtype == torch.float32 else h.to(dtype))


class RMSNorm:
    """`rms_norm` with an RMSNorm module's weight and epsilon."""

    __slots__ = ("weight", "eps", "width")

    def __init__(self, module: torch.nn.Module) -> None:
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        self.weight = weight
        self.eps = torch.tensor(float(module.variance_epsilon), dtype=torch.float32)  # type: ignore[arg-type]
        self.width = torch.tensor(float(weight.shape[-1]), dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.width)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x [T, H, D] (see the module docstring)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class _Layer:
    """One decoder layer's weights and settings, read from its modules once."""

    def __init__(self, layer: Any, family: Family, config: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.index = int(attn.layer_idx)
        self.input_norm = RMSNorm(layer.input_layernorm)
        self.post_norm = RMSNorm(layer.post_attention_layernorm)
        self.qkv = Projections([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = projection(attn.o_proj)
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj])
        self.down_proj = projection(mlp.down_proj)
        self.q_norm = RMSNorm(attn.q_norm) if family.qk_norm else None
        self.k_norm = RMSNorm(attn.k_norm) if family.qk_norm else None
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scaling)
        self.window = _window(attn, family, config)
        self.q_width, self.k_width, _ = self.qkv.widths

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D] after the rotary embedding (and Qwen3's q/k norms)."""
        tokens, d = x.shape[0], self.head_dim
        stacked = self.qkv.stacked(x) if self.q_norm is None else None
        if stacked is not None:  # q and k are adjacent columns: one rotary pass over both
            qk_width = self.q_width + self.k_width
            qk = _rotate(stacked[:, :qk_width].view(tokens, -1, d), cos, sin_signed)
            heads = self.q_width // d
            return qk[:, :heads], qk[:, heads:], stacked[:, qk_width:].view(tokens, -1, d)
        q, k, v = self.qkv(x)
        q, k, v = q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return _rotate(q, cos, sin_signed), _rotate(k, cos, sin_signed), v


def _window(attn: Any, family: Family, config: Any) -> int | None:
    """The sliding window transformers hands the attention function for this layer."""
    if family.window_from == "config":
        return getattr(config, "sliding_window", None)
    if family.window_from == "module":
        return getattr(attn, "sliding_window", None)
    return None


class LeanDecoder:
    """``__call__(ids, positions, meta, kv, keep, op)``: float32 logits of the rows ``keep`` of one
    flattened step, equal to those of the model's own forward with sageLLM's attention function."""

    def __init__(self, model: Any) -> None:
        reason = lean_refusal(model)
        if reason is not None:
            raise ValueError(f"lean decoder: {reason}")
        family = family_of(model)
        assert family is not None
        config = model.config
        base = model.model
        self.embedding = base.embed_tokens.weight
        self.rotary = base.rotary_emb
        self.layers = [_Layer(layer, family, config) for layer in list(base.layers)[: config.num_hidden_layers]]
        self.norm = RMSNorm(base.norm)
        self.lm_head = projection(model.lm_head)
        self._pool_views: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _layer_caches(self, kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = kv.data_ptr()
        if self._pool_views is None or self._pool_views[0] != key:
            self._pool_views = (key, [(kv[i][0], kv[i][1]) for i in range(kv.shape[0])])
        return self._pool_views[1]

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(h, positions[None])
        cos, sin = cos[0][:, None], sin[0][:, None]  # [T, 1, D]
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor,
                 keep: torch.Tensor, op: Any) -> torch.Tensor:
        h = F.embedding(ids, self.embedding)
        cos, sin_signed = self._rotary(h, positions)
        caches = self._layer_caches(kv)
        tokens = h.shape[0]
        for layer in self.layers:
            q, k, v = layer.attention_inputs(layer.input_norm(h), cos, sin_signed)
            k_cache, v_cache = caches[layer.index]
            attn = op(q, k, v, k_cache, v_cache, meta, layer.scale, layer.window)
            h = layer.o_proj.add_to(h, attn.reshape(tokens, -1))
            gate, up = layer.gate_up(layer.post_norm(h))
            h = layer.down_proj.add_to(h, F.silu(gate) * up)
        return self.lm_head(self.norm(h)[keep]).float()


def lean_decoder(model: Any) -> LeanDecoder | None:
    """A `LeanDecoder` for ``model``, or None when `lean_refusal` refuses it."""
    return None if lean_refusal(model) is not None else LeanDecoder(model)
