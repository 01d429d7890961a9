"""Which models sageLLM runs right: checks made at load time, so that a model either generates what
transformers' own ``generate`` would or is refused with a message naming what is missing. Nothing
may crash at request time or silently differ.

Two stages:

* `check_config`, before any weights are read: a decoder-only causal LM whose transformers class
  routes attention through the attention-function interface (``_supports_attention_backend``);
  sageLLM's paged KV cache plugs in there and nowhere else.
* `check_model`, on the loaded model: one two-token forward pass with a recording attention
  function (`probe_attention`) shows what every layer really asks of attention (keyword arguments,
  K/V shapes, causality), which is then checked against what the engine handles and what the
  selected backend's attention op implements (`sagellm_core.attention.features`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import attrs

from sagellm_core.attention.features import ALL_FEATURES, FEATURE_ARGUMENTS
from sagellm_core.errors import ModelLoadError

PROBE_IMPLEMENTATION = "sagellm_support_probe"

# Keyword arguments the attention hook reads (the features, and the step context the runner passes).
HANDLED_ARGUMENTS = frozenset(FEATURE_ARGUMENTS) | {"sagellm_step"}
# Keyword arguments that do not change what attention computes (or that the hook replaces: the
# runner passes positions and runs without transformers' cache). ``is_causal`` is checked apart.
NEUTRAL_ARGUMENTS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states",
    "output_router_logits", "return_dict", "num_items_in_batch", "is_causal",
})
FEATURE_DESCRIPTIONS = {
    "sliding_window": "a sliding attention window (sliding_window)",
    "attention_sinks": "attention sinks (s_aux)",
    "logit_softcapping": "attention logit soft-capping (softcap)",
}


class UnsupportedModelError(ModelLoadError):
    """The model loads in transformers but sageLLM would not run it correctly; the message says why."""


@attrs.frozen
class AttentionCall:
    """What one attention layer passed to the attention function during the probe."""

    module: str
    layer_idx: int | None
    causal: bool
    dropout: float
    kv_layout: tuple[int, int, int, int]  # key heads, key head size, value heads, value head size
    features: frozenset[str]
    unhandled: frozenset[str]  # keyword arguments with a value that the hook would drop
    received_step: bool  # the model forwarded its extra keyword arguments down to attention


_recording = threading.local()
_STEP_SENTINEL = object()


def _record(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
            dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """The probe's attention function: records the call, returns zeros of the right shape."""
    given = {name for name, arg in kwargs.items() if arg is not None}
    causal = bool(getattr(module, "is_causal", True)) and kwargs.get("is_causal") is not False
    _recording.calls.append(AttentionCall(
        module=type(module).__name__,
        layer_idx=getattr(module, "layer_idx", None),
        causal=causal,
        dropout=float(dropout or 0.0),
        kv_layout=(int(key.shape[1]), int(key.shape[-1]), int(value.shape[1]), int(value.shape[-1])),
        features=frozenset(FEATURE_ARGUMENTS[name] for name in given & FEATURE_ARGUMENTS.keys()),
        unhandled=frozenset(given - HANDLED_ARGUMENTS - NEUTRAL_ARGUMENTS),
        received_step=kwargs.get("sagellm_step") is _STEP_SENTINEL,
    ))
    batch, heads, length = query.shape[:3]
    return query.new_zeros(batch, length, heads, value.shape[-1]), None


def _attention_configs(model: Any) -> list[Any]:
    found = [model.config]
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and all(config is not c for c in found):
            found.append(config)
    return found


@contextlib.contextmanager
def _attention_implementation(model: Any, implementation: str) -> Iterator[None]:
    saved = [(config, config._attn_implementation) for config in _attention_configs(model)]
    try:
        for config, _ in saved:
            config._attn_implementation = implementation
        yield
    finally:
        for config, value in saved:  # top-level first: its setter recurses into sub-configs
            config._attn_implementation = value


def probe_attention(model: Any) -> list[AttentionCall]:
    """Run one two-token forward pass the way the model runner does (positions given, no
    transformers cache, ``sagellm_step`` passed through) and record every attention call.

    Raises `UnsupportedModelError` if that forward pass fails.
    """
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register(PROBE_IMPLEMENTATION, _record)
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.int64, device=device)
    positions = torch.arange(2, device=device)[None]
    _recording.calls = []
    try:
        with _attention_implementation(model, PROBE_IMPLEMENTATION), torch.inference_mode():
            model(input_ids=ids, position_ids=positions, use_cache=False, sagellm_step=_STEP_SENTINEL)
        return list(_recording.calls)
    except Exception as exc:
        raise UnsupportedModelError(
            f"{_describe(model)} cannot run on sageLLM: a forward pass through sageLLM's attention function "
            f"failed ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        _recording.calls = []


def causal_lm_class(config: Any) -> type | None:
    """The transformers class `AutoModelForCausalLM` would build for ``config``, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    mapping: Any = MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def check_config(config: Any) -> None:
    """Refuse, before loading weights, what is not a decoder-only causal LM running through
    transformers' attention interface."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model type {model_type!r} is an encoder-decoder model; sageLLM runs decoder-only causal "
            f"language models"
        )
    cls = causal_lm_class(config)
    if cls is None:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(config).__name__}) is not a causal language model: transformers has "
            f"no AutoModelForCausalLM class for it, and sageLLM runs decoder-only causal language models"
        )
    _check_class(cls, model_type)


def _check_class(cls: type, model_type: str) -> None:
    if not getattr(cls, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{cls.__name__} ({model_type}) cannot run on sageLLM: transformers marks the class "
            f"_supports_attention_backend = False (its attention layers do not go through the attention-function "
            f"interface that sageLLM's paged KV cache plugs into)"
        )


def _describe(model: Any) -> str:
    return f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"


def model_problems(model: Any, calls: list[AttentionCall], op_features: frozenset[str]) -> list[str]:
    """Why the recorded attention calls cannot run right with an op implementing ``op_features``
    (empty: they can)."""
    from sagellm_core.models.runner import kv_shape

    if not calls:
        return ["none of its layers calls transformers' attention interface"]
    problems: list[str] = []
    if not all(call.received_step for call in calls):
        problems.append("its attention layers do not receive the keyword arguments of the model's forward "
                        "(sageLLM passes its paged KV cache through them)")
    if any(call.layer_idx is None for call in calls):
        problems.append("its attention modules have no layer_idx (sageLLM indexes the KV cache by layer)")
    if not all(call.causal for call in calls):
        problems.append("its attention is bidirectional (not causal)")
    dropouts = {call.dropout for call in calls if call.dropout}
    if dropouts:
        problems.append(f"its attention applies dropout {sorted(dropouts)} at inference")
    num_layers, kv_heads, head_dim = kv_shape(model)
    indices = [call.layer_idx for call in calls]
    known = sorted(index for index in indices if index is not None)
    if len(known) == len(indices) and known != list(range(num_layers)):
        problems.append(f"its attention layers {sorted(set(known))} are not one per layer of its {num_layers} "
                        f"layers (layers without attention, such as state-space or linear-attention mixers, or "
                        f"layers sharing a KV cache, are not supported)")
    expected = (kv_heads, head_dim, kv_heads, head_dim)
    layouts = sorted({call.kv_layout for call in calls} - {expected})
    if layouts:
        shown = ", ".join(f"{k} key heads of size {kd} and {v} value heads of size {vd}" for k, kd, v, vd in layouts)
        problems.append(f"its attention layers produce {shown}, while the KV cache is laid out from its config as "
                        f"{kv_heads} heads of size {head_dim} for both (e.g. multi-head latent attention is not "
                        f"supported)")
    unhandled = sorted(set().union(*(call.unhandled for call in calls)))
    if unhandled:
        problems.append(f"its attention passes arguments sageLLM does not handle: {', '.join(unhandled)}")
    missing = sorted(set().union(*(call.features for call in calls)) - op_features)
    if missing:
        have = ", ".join(sorted(op_features)) or "none"
        problems.append(f"it needs {' and '.join(FEATURE_DESCRIPTIONS[f] for f in missing)}, which this backend's "
                        f"attention op does not implement (it implements: {have})")
    return problems


def check_model(model: Any, op_features: frozenset[str] = ALL_FEATURES, backend_name: str = "cpu") -> None:
    """Refuse a loaded model that would not generate what transformers generates: raises
    `UnsupportedModelError` listing every reason. ``op_features``: what the selected backend's
    attention op implements (`sagellm_core.attention.features.op_features`)."""
    _check_class(type(model), getattr(model.config, "model_type", "?"))
    problems = model_problems(model, probe_attention(model), op_features)
    if problems:
        raise UnsupportedModelError(
            f"{_describe(model)} cannot run correctly on sageLLM's {backend_name!r} backend: " + "; ".join(problems)
        )
