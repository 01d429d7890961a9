"""Which models the lean decoder (`sagellm_core.models.lean_decoder`) runs: the Llama-style families
whose decoder layers compute exactly ``x + o(attn(rope(q(n1(x))), rope(k(..)), v(..)))`` then
``h + down(silu(gate(n2(h))) * up(n2(h)))`` with RMSNorms, and nothing else.

Every check compares exact classes (a subclass may override any step), so a model that differs in
any way the lean forward does not reproduce is refused, with the reason, and runs through
transformers' modules as before.
"""

from __future__ import annotations

import importlib
from typing import Any

import attrs
import torch

from sagellm_core.models.lean_projection import unsupported_projection


@attrs.frozen
class Family:
    """One transformers model family's classes (names inside ``transformers.models.<module>``)."""

    module: str
    prefix: str
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before the rotary embedding
    window_from: str = "none"  # where the layer's sliding window comes from: none, config, module

    def cls(self, suffix: str) -> type:
        return getattr(importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}"),
                       f"{self.prefix}{suffix}")


FAMILIES = {
    "LlamaForCausalLM": Family("llama", "Llama"),
    "MistralForCausalLM": Family("mistral", "Mistral", window_from="config"),
    "Qwen2ForCausalLM": Family("qwen2", "Qwen2", window_from="module"),
    "Qwen3ForCausalLM": Family("qwen3", "Qwen3", qk_norm=True, window_from="module"),
}


def family_of(model: Any) -> Family | None:
    """The family of ``model``'s exact class, if the lean decoder knows it."""
    family = FAMILIES.get(type(model).__name__)
    if family is None or type(model) is not family.cls("ForCausalLM"):
        return None
    return family


def _plain(module: torch.nn.Module, expected: type, what: str) -> str | None:
    if type(module) is not expected:
        return f"{what} is {type(module).__name__}, not {expected.__name__}"
    if "forward" in vars(module) or module._forward_hooks or module._forward_pre_hooks:
        return f"{what} has a replaced forward or hooks"
    return None


def _layer_refusal(layer: Any, family: Family, index: int) -> str | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return f"layer {index} has no self_attn / mlp"
    norm = family.cls("RMSNorm")
    checks = [_plain(layer, family.cls("DecoderLayer"), f"layer {index}"),
              _plain(attn, family.cls("Attention"), f"layer {index} attention"),
              _plain(mlp, family.cls("MLP"), f"layer {index} MLP"),
              _plain(layer.input_layernorm, norm, f"layer {index} input norm"),
              _plain(layer.post_attention_layernorm, norm, f"layer {index} post-attention norm")]
    if family.qk_norm:
        checks += [_plain(attn.q_norm, norm, f"layer {index} q_norm"), _plain(attn.k_norm, norm, f"layer {index} k_norm")]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        checks.append(unsupported_projection(getattr(attn, name)))
    for name in ("gate_proj", "up_proj", "down_proj"):
        checks.append(unsupported_projection(getattr(mlp, name)))
    if type(mlp.act_fn).__name__ != "SiLUActivation" or "forward" in vars(mlp.act_fn):
        checks.append(f"layer {index} activation {type(mlp.act_fn).__name__}")
    if getattr(attn, "layer_idx", None) != index:
        checks.append(f"layer {index} attention has layer_idx {getattr(attn, 'layer_idx', None)}")
    return next((c for c in checks if c is not None), None)


def lean_refusal(model: Any) -> str | None:
    """Why the lean decoder cannot run ``model`` exactly as transformers does (None: it can)."""
    family = family_of(model)
    if family is None:
        return f"{type(model).__name__} is not one of {', '.join(FAMILIES)}"
    if model.training:
        return "the model is in training mode"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r}"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    base = model.model
    checks = [_plain(model, family.cls("ForCausalLM"), "model"), _plain(base, family.cls("Model"), "base model"),
              _plain(base.embed_tokens, torch.nn.Embedding, "embedding"),
              _plain(base.norm, family.cls("RMSNorm"), "final norm"),
              _plain(base.rotary_emb, family.cls("RotaryEmbedding"), "rotary embedding"),
              unsupported_projection(model.lm_head)]
    if base.embed_tokens.max_norm is not None:
        checks.append("embedding with max_norm")
    layers = list(base.layers)[: config.num_hidden_layers]
    checks += [_layer_refusal(layer, family, i) for i, layer in enumerate(layers)]
    return next((c for c in checks if c is not None), None)
