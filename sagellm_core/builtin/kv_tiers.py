"""Built-in KV tiers: ``host`` (``kv_tiers.host_bytes``) and ``disk`` (``kv_tiers.disk_path``)."""

from __future__ import annotations

from sagellm_core.hookspecs import Register, hookimpl
from sagellm_core.kv.tiers.base import TierContext
from sagellm_core.kv.tiers.disk import DiskTier
from sagellm_core.kv.tiers.host import HostTier


def host_tier(context: TierContext) -> HostTier:
    return HostTier(context, context.config.host_bytes)


def disk_tier(context: TierContext) -> DiskTier:
    return DiskTier(context, context.config.disk_path, context.config.disk_bytes)


@hookimpl
def sagellm_register_kv_tiers(register: Register) -> None:
    """Register the ``host`` and ``disk`` tiers (sized by the ``kv_tiers`` config section)."""
    register("host", host_tier)
    register("disk", disk_tier)
