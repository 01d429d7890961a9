"""The start-up summary the server logs once the model is loaded."""

from __future__ import annotations

from sagellm_core.engine.info import EngineInfo


def startup_summary(info: EngineInfo, served_model_name: str, address: str | None, topology: str = "") -> str:
    """One line: model, dtype, backend, KV pool (blocks, tokens, bytes), max model length, address,
    and how the server runs (engine process, front ends, replicas)."""
    where = f" at {address}" if address else ""
    blocks, block_size = info.num_blocks, info.block_size
    scheduler = info.config["scheduler"]
    return (f"serving {info.model_name!r} as {served_model_name!r}{where}: dtype {info.dtype}, backend "
            f"{info.backend}, KV cache {blocks} blocks x {block_size} tokens "
            f"({blocks * block_size} tokens, {info.kv_bytes / 2**20:.1f} MiB) in {info.num_pools} pool(s), "
            f"max model length {info.max_model_len}, scheduler {scheduler['name']} (max_num_seqs "
            f"{scheduler['max_num_seqs']}, max_num_batched_tokens {scheduler['max_num_batched_tokens']})"
            + (f", {topology}" if topology else ""))
