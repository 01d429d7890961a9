"""Paged attention: the per-step metadata, the hook that plugs it into transformers' models, the
plain-torch reference op (the oracle every backend is tested against) and the CPU backend's op.
Device backends ship their own ops (`Backend.attention_op`); `sagellm_cuda.attention` is the Triton one."""

from sagellm_core.attention.metadata import AttentionMetadata

__all__ = ["AttentionMetadata"]
