"""Options shared by the sub-commands that build an engine."""

from __future__ import annotations

import argparse
from typing import Any

from sagellm_core.config import EngineConfig


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model directory, .gguf file or cached hub id "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument("--backend", default=None, help="backend name (cpu, cuda, ...); default: auto")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--scheduler", default=None, help="scheduler plugin name (fcfs, priority, pd, ...)")
    parser.add_argument("--pd-mode", default=None, choices=["strict", "time_share", "hybrid"],
                        help="with --scheduler pd")
    parser.add_argument("--kv-policy", default=None, help="KV policy plugin name (prefix_lru, no_reuse)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    parser.add_argument("--quantization", default=None, choices=["auto", "none", "int8", "int4", "fp8"],
                        help="weight format (default auto: a GGUF's own on the CPU backend, else none)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8"])


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Config file first, then the command-line overrides (errors name the field path)."""
    base = EngineConfig.from_yaml(args.config) if args.config else EngineConfig()
    sections: dict[str, dict[str, Any]] = {"model": {}, "backend": {}, "scheduler": {}, "kv_cache": {}}
    for value, section, key in (
        (args.model, "model", "path"), (args.dtype, "model", "dtype"), (args.max_model_len, "model", "max_model_len"),
        (args.load_format, "model", "load_format"), (args.backend, "backend", "name"),
        (args.scheduler, "scheduler", "name"), (args.kv_policy, "kv_cache", "policy"),
        (args.num_kv_blocks, "kv_cache", "num_blocks"),
        (getattr(args, "quantization", None), "model", "quantization"),
        (getattr(args, "kv_cache_dtype", None), "kv_cache", "dtype"),
    ):
        if value is not None:
            sections[section][key] = value
    if args.pd_mode is not None:
        sections["scheduler"]["name"] = sections["scheduler"].get("name", "pd")
        sections["scheduler"]["options"] = {**base.scheduler.options, "mode": args.pd_mode}
    return base.evolve(**{k: v for k, v in sections.items() if v})
