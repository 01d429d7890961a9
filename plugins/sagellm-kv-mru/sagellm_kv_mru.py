"""sageLLM KV-policy plugin ``mru``: when a block must be given up, give up the most recently freed
one; take part in prefix reuse only for prompts longer than ``min_prompt_tokens``.

MRU keeps the *oldest* cached prefixes, which suits workloads whose shared prefix (a system prompt)
was cached first and whose recent requests rarely repeat. Never-used blocks are always handed out
before any cached block is given up (`FreeQueuePolicy` does that), so MRU costs no prefix hits while
the pool has room.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from sagellm_core.hookspecs import Register, hookimpl
from sagellm_core.kv.policy import Block, FreeQueuePolicy
from sagellm_core.options import at_least

if TYPE_CHECKING:
    from sagellm_core.request import Request

SAGELLM_PLUGIN_API = ">=1.0,<2"


@attrs.frozen
class MRUOptions:
    """``kv_cache.policy_options`` of the ``mru`` policy."""

    min_prompt_tokens: int = attrs.field(default=0, validator=at_least(0))
    """Prompts of at most this many tokens neither hit cached prefixes nor publish their blocks."""


class MRUPolicy(FreeQueuePolicy):
    """Evict the most recently freed block; reuse prefixes only of prompts longer than the minimum."""

    name = "mru"

    def __init__(self, options: MRUOptions | None = None) -> None:
        super().__init__(options)
        self.settings = options or MRUOptions()

    def should_cache(self, request: Request) -> bool:
        return request.num_prompt_tokens > self.settings.min_prompt_tokens

    def push_free(self, blocks: list[Block]) -> None:
        # A request's blocks arrive tail first (the manager's suggested eviction order); store them
        # reversed so that the newest end of ``self.freed`` gives up the tail before the prefix.
        super().push_free(blocks[::-1])

    def pick_victim(self) -> Block:
        return self.freed.popitem(last=True)[1]  # the most recently freed block


@hookimpl
def sagellm_register_kv_policies(register: Register) -> None:
    """Register the ``mru`` KV policy with its options class."""
    register("mru", MRUPolicy, options=MRUOptions)
