"""Options shared by the sub-commands that build an engine.

Precedence: built-in defaults < ``--config`` YAML file < ``SAGELLM_<SECTION>__<FIELD>`` environment
variables < command-line flags. Plugin options come from ``--scheduler-option KEY=VALUE``,
``--kv-policy-option KEY=VALUE``, ``--metric-option SINK.KEY=VALUE`` and ``--backend-option
KEY=VALUE`` (repeatable; VALUE is a YAML scalar: ``8``, ``0.5``, ``true``, ``text``); they are
merged over the file's options and validated with the rest of the plugin selection. Any config field
has a flag: ``--set SECTION.FIELD=VALUE`` (repeatable, deeper keys too: ``--set
scheduler.options.mode=strict``), applied after the other flags.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from sagellm_core.config import EngineConfig, _env_value, _merge, load_config
from sagellm_core.errors import ConfigError

PLUGIN_OPTION_FLAGS = {
    # dest: (flag, config section, options key in that section)
    "scheduler_option": ("--scheduler-option", "scheduler", "options"),
    "kv_policy_option": ("--kv-policy-option", "kv_cache", "policy_options"),
    "metric_option": ("--metric-option", "metrics", "options"),
    "backend_option": ("--backend-option", "backend", "options"),
}


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Add the model, config, backend, scheduler, KV and plugin-option flags to ``parser``."""
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
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="shard every layer over this many devices, one process each (parallel.tensor_parallel_size)")
    parser.add_argument("--pd-split", action="store_true", default=None,
                        help="strict PD with the decode pool on a second device and process (parallel.pd_split)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="scheduler.max_num_seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="scheduler.max_num_batched_tokens")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="no decode graphs: every step runs eagerly (backend.cuda_graphs: false)")
    parser.add_argument("--load-format", default=None, choices=["auto", "dummy"])
    parser.add_argument("--quantization", default=None, choices=["auto", "none", "int8", "int4", "fp8"],
                        help="weight format (default auto: a GGUF's own on the CPU backend, else none)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8"],
                        help="KV cache storage (default auto: the model dtype; fp8: E4M3, half the bytes)")
    parser.add_argument("--metric", action="append", default=None, metavar="NAME",
                        help="run this metric sink as well as the configured ones (repeatable)")
    parser.add_argument("--set", dest="config_set", action="append", default=None, metavar="SECTION.FIELD=VALUE",
                        help="set any config field (repeatable; VALUE is YAML; e.g. --set kv_cache.block_size=32, "
                             "--set scheduler.async_scheduling=off)")
    for dest, (flag, _, _) in PLUGIN_OPTION_FLAGS.items():
        what = "SINK.KEY=VALUE" if dest == "metric_option" else "KEY=VALUE"
        parser.add_argument(flag, dest=dest, action="append", default=None, metavar=what,
                            help=f"{flag[2:].replace('-option', '').replace('-', ' ')} plugin option "
                                 "(repeatable; VALUE is YAML)")


def parse_option(text: str, flag: str, *, dotted: bool = False) -> tuple[list[str], Any]:
    """``"key=value"`` -> (["key"], value as YAML); with ``dotted``, ``"sink.key=value"`` ->
    (["sink", "key"], value). Errors name the flag and the text."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".", 1) if dotted else [key.strip()]
    if not sep or not all(keys) or (dotted and len(keys) != 2):
        form = "SINK.KEY=VALUE" if dotted else "KEY=VALUE"
        raise ConfigError(f"{flag} {text!r}: expected {form}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{flag} {text!r}: VALUE is not valid YAML: {exc}") from None
    return keys, value


def _plugin_options(args: argparse.Namespace, base: EngineConfig) -> dict[str, dict[str, Any]]:
    current = base.to_dict()
    sections: dict[str, dict[str, Any]] = {}
    for dest, (flag, section, field) in PLUGIN_OPTION_FLAGS.items():
        for text in getattr(args, dest, None) or []:
            keys, value = parse_option(text, flag, dotted=dest == "metric_option")
            options = sections.setdefault(section, {}).setdefault(field, dict(current[section][field]))
            if len(keys) == 2:
                options[keys[0]] = {**options.get(keys[0], {}), keys[1]: value}
            else:
                options[keys[0]] = value
    return sections


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Config file, then the environment, then the command-line flags (errors name the field path)."""
    base = load_config(args.config)
    sections: dict[str, dict[str, Any]] = {"model": {}, "backend": {}, "scheduler": {}, "kv_cache": {}, "metrics": {},
                                           "parallel": {}}
    for value, section, key in (
        (args.model, "model", "path"), (args.dtype, "model", "dtype"), (args.max_model_len, "model", "max_model_len"),
        (args.load_format, "model", "load_format"), (args.backend, "backend", "name"),
        (args.scheduler, "scheduler", "name"), (args.kv_policy, "kv_cache", "policy"),
        (args.num_kv_blocks, "kv_cache", "num_blocks"), (args.max_num_seqs, "scheduler", "max_num_seqs"),
        (args.max_num_batched_tokens, "scheduler", "max_num_batched_tokens"),
        (getattr(args, "quantization", None), "model", "quantization"),
        (getattr(args, "kv_cache_dtype", None), "kv_cache", "dtype"),
        (getattr(args, "tensor_parallel_size", None), "parallel", "tensor_parallel_size"),
        (getattr(args, "pd_split", None), "parallel", "pd_split"),
        (False if getattr(args, "enforce_eager", None) else None, "backend", "cuda_graphs"),
    ):
        if value is not None:
            sections[section][key] = value
    if getattr(args, "metric", None):
        sections["metrics"]["extra"] = [*base.metrics.extra, *args.metric]
    if args.pd_mode is not None:
        sections["scheduler"]["name"] = sections["scheduler"].get("name", "pd")
        sections["scheduler"]["options"] = {**base.scheduler.options, "mode": args.pd_mode}
    for section, fields in _plugin_options(args, base).items():
        for field, options in fields.items():
            if field in sections[section] and isinstance(sections[section][field], dict):
                options = {**sections[section][field], **options}
            sections[section][field] = options
    config = base.evolve(**{k: v for k, v in sections.items() if v})
    return apply_sets(config, getattr(args, "config_set", None) or [])


def apply_sets(config: EngineConfig, texts: list[str]) -> EngineConfig:
    """``config`` with each ``SECTION.FIELD[.KEY...]=VALUE`` of ``texts`` set (errors name the path).
    VALUE is YAML, except for string fields, which keep the text (as the environment variables do)."""
    overrides: dict[str, Any] = {}
    for text in texts:
        path, sep, raw = text.partition("=")
        keys = [key.strip() for key in path.split(".")]
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(f"--set {text!r}: expected SECTION.FIELD=VALUE")
        value = _env_value(keys, raw, f"--set {path}")  # a string field keeps the text ("off", "yes")
        target = overrides
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return EngineConfig.from_dict(_merge(config.to_dict(), overrides)) if overrides else config
