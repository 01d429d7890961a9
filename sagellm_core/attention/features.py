"""Optional attention features a model's layers may ask for, and which of them an op implements.

Every op handles causal attention with a scale. Beyond that, transformers' attention modules pass
keyword arguments that change the result: a sliding window, attention sinks (gpt-oss: ``s_aux``),
logit soft-capping (Gemma 2: ``softcap``). An op lists the ones it implements in its
``supported_features`` attribute; the loader refuses a model whose layers need one the selected
backend's op lacks (`sagellm_core.models.support`), so no model runs silently wrong.
"""

from __future__ import annotations

from typing import Any

SLIDING_WINDOW = "sliding_window"
ATTENTION_SINKS = "attention_sinks"
LOGIT_SOFTCAPPING = "logit_softcapping"

ALL_FEATURES = frozenset({SLIDING_WINDOW, ATTENTION_SINKS, LOGIT_SOFTCAPPING})

# The transformers keyword argument that asks for each feature (a feature is asked for when its
# argument is passed and not None).
FEATURE_ARGUMENTS = {"sliding_window": SLIDING_WINDOW, "s_aux": ATTENTION_SINKS, "softcap": LOGIT_SOFTCAPPING}

# Ops that do not declare ``supported_features``: the sliding window has always been part of the
# `PagedAttentionOp` signature, nothing else is assumed.
DEFAULT_FEATURES = frozenset({SLIDING_WINDOW})


def op_features(op: Any) -> frozenset[str]:
    """The features ``op`` declares in ``supported_features`` (`DEFAULT_FEATURES` if it declares none)."""
    declared = getattr(op, "supported_features", None)
    return DEFAULT_FEATURES if declared is None else frozenset(declared)
