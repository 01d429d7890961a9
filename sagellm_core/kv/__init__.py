"""Paged KV cache bookkeeping (no tensors): blocks, policies, per-pool manager."""
