"""What a front end needs to know about a built engine, as plain data: it crosses process boundaries
(the engine process sends it once it is ready) and feeds the server's start-up summary, model cards,
sampling defaults and ``/v1/config``."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class EngineInfo:
    """A built engine's facts. ``config`` is the effective `EngineConfig` as a dict."""

    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    generation_defaults: dict[str, Any]
    dtype: str
    backend: str
    block_size: int
    num_blocks: int
    num_pools: int
    kv_bytes: int
    config: dict[str, Any]

    @classmethod
    def of(cls, engine: Any) -> "EngineInfo":
        """The facts of an `LLMEngine` (read on the thread that owns it)."""
        from sagellm_core.inputs import generation_defaults
        from sagellm_core.models.kv_cache import kv_bytes_per_block

        block_size = engine.config.kv_cache.block_size
        blocks = sum(pool.num_blocks for pool in engine.kv_pools)
        return cls(model_name=engine.model_name, max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                   eos_token_ids=frozenset(engine.eos_token_ids), generation_defaults=generation_defaults(engine.model),
                   dtype=str(engine.dtype).removeprefix("torch."), backend=engine.backend_choice.spec.name,
                   block_size=block_size, num_blocks=blocks, num_pools=len(engine.kv_pools),
                   kv_bytes=blocks * kv_bytes_per_block(engine.model, block_size, engine.dtype),
                   config=engine.config.to_dict())

    def merged(self, others: list["EngineInfo"]) -> "EngineInfo":
        """The facts of data-parallel replicas seen as one engine (KV blocks and bytes add up)."""
        return attrs.evolve(self, num_blocks=self.num_blocks + sum(o.num_blocks for o in others),
                            num_pools=self.num_pools + sum(o.num_pools for o in others),
                            kv_bytes=self.kv_bytes + sum(o.kv_bytes for o in others),
                            max_model_len=min([self.max_model_len, *(o.max_model_len for o in others)]))
