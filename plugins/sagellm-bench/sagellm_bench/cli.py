"""`sagellm bench {throughput,sampling,latency,serve,prefix,pd}`: benchmarks that write JSON, markdown and PNG files.

Workload defaults come from the config's ``benchmark`` section (`BenchmarkConfig`, nano-vllm's shape)
unless given on the command line. ``--model-shape`` benchmarks a real architecture with random weights.
The engine options (``--config``, ``--max-num-seqs``, ...) are `sagellm serve`'s
(`sagellm_core.cli.common.add_engine_options`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sagellm_bench.shapes import SHAPES
from sagellm_core.cli.common import add_engine_options, engine_config
from sagellm_core.config import BenchmarkConfig, EngineConfig
from sagellm_core.errors import ConfigError

SHAPE_NAMES = tuple(SHAPES)
DEFAULTS = BenchmarkConfig()
HELP = "benchmarks: throughput, sampling, latency, serve, prefix, pd, multiturn"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-commands (the ``add_arguments`` of the registered command)."""
    benches = parser.add_subparsers(dest="bench", required=True)
    for add in (_add_throughput, _add_sampling, _add_latency, _add_serve, _add_prefix, _add_pd, _add_multiturn):
        add(benches)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark (the ``run`` of the registered command)."""
    return int(args.bench_run(args) or 0)


# ---- options -------------------------------------------------------------------------------------
def _add_common(parser: argparse.ArgumentParser, temperature: float) -> None:
    add_engine_options(parser)
    parser.add_argument("--model-shape", choices=SHAPE_NAMES, default=None,
                        help="random weights of this real architecture (implies --load-format dummy)")
    parser.add_argument("--output-dir", default="bench_results", help="where the JSON / markdown / PNG files go")
    parser.add_argument("--seed", type=int, default=None, help=f"workload seed (default {DEFAULTS.seed})")
    parser.add_argument("--temperature", type=float, default=temperature, help="sampling temperature (0 = greedy)")
    parser.set_defaults(_parser=parser)


def _add_lengths(parser: argparse.ArgumentParser, num_requests: int | None = None) -> None:
    default_n = num_requests or DEFAULTS.num_requests
    parser.add_argument("--num-requests", type=int, default=None, help=f"default {default_n}")
    parser.add_argument("--min-input-len", type=int, default=None, help=f"default {DEFAULTS.min_input_len}")
    parser.add_argument("--max-input-len", type=int, default=None, help=f"default {DEFAULTS.max_input_len}")
    parser.add_argument("--min-output-len", type=int, default=None, help=f"default {DEFAULTS.min_output_len}")
    parser.add_argument("--max-output-len", type=int, default=None, help=f"default {DEFAULTS.max_output_len}")
    parser.set_defaults(_default_num_requests=num_requests)


def _add_rate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrivals in requests/s (default inf: all at once)")


def _add_throughput(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("throughput", help="offline throughput on a seeded random workload")
    _add_lengths(parser)
    parser.add_argument("--compare", choices=["hf"], default=None, help="also run transformers on the same workload")
    parser.add_argument("--hf-batch-size", type=int, default=32, help="static batch size of the HF peer")
    parser.add_argument("--hf-continuous", choices=["auto", "on", "off"], default="auto",
                        help="transformers continuous batching as a second peer (auto: on GPUs only)")
    parser.add_argument("--hf-model", choices=["same", "transformers"], default="same",
                        help="the peer's model: the object sageLLM ran (same; quantized layers included) or "
                             "the checkpoint as transformers loads it (transformers; real weights only)")
    _add_common(parser, temperature=0.6)
    parser.set_defaults(bench_run=_run_throughput)


def _add_sampling(benches: argparse._SubParsersAction) -> None:
    from sagellm_bench.sampling import MIXES

    parser = benches.add_parser("sampling", help="each sampling parameter, the default configuration and the "
                                                 "first run, as ratios to the plain path (one run)")
    _add_lengths(parser)
    parser.add_argument("--mix", action="append", choices=list(MIXES), default=None,
                        help="run only these mixes (repeatable; plain always runs)")
    parser.add_argument("--no-defaults", action="store_true", help="skip the default-configuration engine")
    _add_common(parser, temperature=0.6)
    parser.set_defaults(bench_run=_run_sampling)


def _add_latency(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("latency", help="batch-1 TTFT / TPOT against the weight-read floor")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-iters", type=int, default=5, help="timed iterations per engine (alternating)")
    parser.add_argument("--num-warmup", type=int, default=1)
    parser.add_argument("--compare", choices=["hf"], default=None, help="also run transformers batch 1")
    _add_common(parser, temperature=0.0)
    parser.set_defaults(bench_run=_run_latency)


def _add_serve(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("serve", help="Poisson load against an OpenAI-compatible server (SSE)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--launch", action="store_true",
                        help="start `sagellm serve` with every engine option given here (budgets, --config, ...)")
    parser.add_argument("--launch-timeout", type=float, default=600.0, help="seconds to wait for /health")
    parser.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                        help="one or more rates in requests/s (inf: all at once)")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--prompt-kind", choices=["tokens", "text"], default="tokens")
    parser.add_argument("--vocab-size", type=int, default=None, help="token-id range (default: the model's)")
    parser.add_argument("--served-model-name", default=None, help="default: the first id of /v1/models")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--compare", choices=["offline"], default=None,
                        help="also run the engine in-process on the same requests and arrivals (first, then "
                             "released before the server starts); print the ratio")
    parser.add_argument("--api-server-count", type=int, default=None,
                        help="with --launch: front-end processes of the server (`sagellm serve --api-server-count`)")
    parser.add_argument("--data-parallel-size", type=int, default=None,
                        help="with --launch: engine replicas of the server (`sagellm serve --data-parallel-size`)")
    parser.add_argument("--no-engine-process", action="store_true", default=None,
                        help="with --launch: the server's engine in its own process is turned off")
    _add_lengths(parser, num_requests=64)
    _add_common(parser, temperature=0.0)
    parser.set_defaults(bench_run=_run_serve)


def _add_prefix(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("prefix", help="shared-prefix workload: prefix_lru vs no_reuse")
    parser.add_argument("--num-groups", type=int, default=8)
    parser.add_argument("--requests-per-group", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    _add_rate(parser)
    _add_common(parser, temperature=0.0)
    parser.set_defaults(bench_run=_run_prefix)


def _add_pd(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("pd", help="one workload under PD modes strict / time_share / hybrid")
    _add_lengths(parser, num_requests=64)
    parser.add_argument("--modes", nargs="+", choices=["strict", "time_share", "hybrid"],
                        default=["strict", "time_share", "hybrid"])
    _add_rate(parser)
    _add_common(parser, temperature=0.0)
    parser.set_defaults(bench_run=_run_pd)


# ---- config --------------------------------------------------------------------------------------
@contextlib.contextmanager
def bench_config(args: argparse.Namespace) -> Iterator[EngineConfig]:
    """The engine config of the run; with ``--model-shape`` its config.json lives in a temp dir meanwhile."""
    config = engine_config(args)
    if args.model_shape is None:
        yield config
        return
    if args.model is not None:
        raise ConfigError("--model and --model-shape are mutually exclusive")
    from sagellm_bench.shapes import write_shape

    with tempfile.TemporaryDirectory(prefix="sagellm-shape-") as directory:
        model_dir = write_shape(args.model_shape, Path(directory) / args.model_shape)  # name = shape name
        yield config.evolve(model={"path": str(model_dir), "load_format": "dummy"})


def _workload_args(args: argparse.Namespace, config: EngineConfig) -> dict[str, Any]:
    """Lengths and counts: the command line, else the config's ``benchmark`` section."""
    bench = config.benchmark

    def pick(name: str, fallback: int) -> int:
        value = getattr(args, name, None)
        return fallback if value is None else value

    default_n = getattr(args, "_default_num_requests", None) or bench.num_requests
    return {
        "num_requests": pick("num_requests", default_n),
        "input_len": (pick("min_input_len", bench.min_input_len), pick("max_input_len", bench.max_input_len)),
        "output_len": (pick("min_output_len", bench.min_output_len), pick("max_output_len", bench.max_output_len)),
    }


def _seed(args: argparse.Namespace, config: EngineConfig) -> int:
    return config.benchmark.seed if args.seed is None else args.seed


# ---- runners -------------------------------------------------------------------------------------
def _run_throughput(args: argparse.Namespace) -> int:
    from sagellm_bench import throughput

    with bench_config(args) as config:
        options = throughput.ThroughputOptions(
            **_workload_args(args, config), seed=_seed(args, config), temperature=args.temperature,
            compare_hf=args.compare == "hf", hf_batch_size=args.hf_batch_size, hf_continuous=args.hf_continuous,
            hf_model=args.hf_model, output_dir=args.output_dir)
        throughput.run(config, options, args)
    return 0


def _run_sampling(args: argparse.Namespace) -> int:
    from sagellm_bench import sampling

    mixes = tuple(dict.fromkeys([sampling.PLAIN, *(args.mix or sampling.MIXES)]))
    with bench_config(args) as config:
        options = sampling.SamplingBenchOptions(
            **_workload_args(args, config), seed=_seed(args, config), temperature=args.temperature, mixes=mixes,
            compare_defaults=not args.no_defaults, output_dir=args.output_dir)
        sampling.run(config, options, args)
    return 0


def _run_latency(args: argparse.Namespace) -> int:
    from sagellm_bench import latency

    with bench_config(args) as config:
        options = latency.LatencyOptions(
            input_len=args.input_len, output_len=args.output_len, num_iters=args.num_iters,
            num_warmup=args.num_warmup, seed=_seed(args, config), temperature=args.temperature,
            compare_hf=args.compare == "hf",
            output_dir=args.output_dir)
        latency.run(config, options, args)
    return 0


def _add_multiturn(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser("multiturn", help="multi-turn conversations: KV tiers off vs on")
    parser.add_argument("--num-conversations", type=int, default=16)
    parser.add_argument("--num-turns", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=256)
    parser.add_argument("--user-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--working-set-factor", type=float, default=5.0,
                        help="device KV pool = working set / this (unless --num-kv-blocks is given)")
    parser.add_argument("--host-tier-bytes", type=int, default=None, help="default: twice the device pool")
    parser.add_argument("--disk-tier-path", default=None, help="default: a temporary directory")
    parser.add_argument("--ungated", action="store_true",
                        help="also run the tiers with the load gate off (kv_tiers.load_gate: false)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="at most this many turns in flight, in turn-major order (default: each turn "
                             "submits every conversation at once)")
    _add_common(parser, temperature=0.0)
    parser.set_defaults(bench_run=_run_multiturn)


def _run_multiturn(args: argparse.Namespace) -> int:
    from sagellm_bench import multiturn

    with bench_config(args) as config:
        options = multiturn.MultiturnOptions(
            num_conversations=args.num_conversations, num_turns=args.num_turns, system_len=args.system_len,
            user_len=args.user_len, output_len=args.output_len, working_set_factor=args.working_set_factor,
            host_bytes=args.host_tier_bytes, disk_path=args.disk_tier_path, seed=_seed(args, config),
            temperature=args.temperature, output_dir=args.output_dir, ungated=args.ungated,
            max_concurrency=args.max_concurrency)
        multiturn.run(config, options, args)
    return 0


def _run_prefix(args: argparse.Namespace) -> int:
    from sagellm_bench import prefix

    with bench_config(args) as config:
        options = prefix.PrefixOptions(
            num_groups=args.num_groups, requests_per_group=args.requests_per_group, prefix_len=args.prefix_len,
            suffix_len=args.suffix_len, output_len=args.output_len, request_rate=args.request_rate,
            seed=_seed(args, config), temperature=args.temperature, output_dir=args.output_dir)
        prefix.run(config, options, args)
    return 0


def _run_pd(args: argparse.Namespace) -> int:
    from sagellm_bench import pd

    with bench_config(args) as config:
        options = pd.PDBenchOptions(
            **_workload_args(args, config), request_rate=args.request_rate, modes=tuple(args.modes),
            seed=_seed(args, config), temperature=args.temperature, output_dir=args.output_dir)
        pd.run(config, options, args)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from sagellm_bench import serve

    if args.compare == "offline" and args.prompt_kind != "tokens":
        raise ConfigError("--compare offline needs --prompt-kind tokens (the in-process engine runs the same "
                          "token-id prompts as the server)")
    with bench_config(args) as config:
        options = serve.ServeOptions(
            base_url=args.base_url, launch=args.launch, launch_args=tuple(serve_argv(args, config)),
            launch_timeout_s=args.launch_timeout, request_rates=tuple(args.request_rate),
            max_concurrency=args.max_concurrency, prompt_kind=args.prompt_kind,
            vocab_size=_serve_vocab(args, config), model_name=args.served_model_name,
            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, compare_offline=args.compare == "offline",
            seed=_seed(args, config), temperature=args.temperature, output_dir=args.output_dir,
            **_workload_args(args, config))
        serve.run(options, config, args)
    return 0


def serve_argv(args: argparse.Namespace, config: EngineConfig) -> list[str]:
    """``sagellm serve`` options for ``--launch``: every engine option given to this command (the budgets and
    ``--config`` included), with ``--model-shape``'s model directory and ``--load-format dummy``."""
    from sagellm_bench.environment import option_argv

    probe = argparse.ArgumentParser(add_help=False)
    add_engine_options(probe)
    given = argparse.Namespace(**{action.dest: getattr(args, action.dest, action.default) for action in probe._actions})
    if args.model_shape is not None:
        given.model, given.load_format = config.model.path, "dummy"
    return option_argv(probe._actions, given) + _server_argv(args)


def _server_argv(args: argparse.Namespace) -> list[str]:
    """How the launched server runs (front ends, replicas, engine process), as given to this command."""
    words = []
    for flag in ("--api-server-count", "--data-parallel-size"):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            words += [flag, str(value)]
    if getattr(args, "no_engine_process", None):
        words.append("--no-engine-process")
    return words


def _serve_vocab(args: argparse.Namespace, config: EngineConfig) -> int:
    if args.vocab_size is not None:
        return args.vocab_size
    return _vocab_size(config) if args.prompt_kind == "tokens" else 32000  # text prompts: ids unused


def _vocab_size(config: EngineConfig) -> int:
    """The served model's vocabulary size, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    from sagellm_core.models import loader

    source = loader.resolve(config.model.path, config.model.gguf_file)
    model_config = AutoConfig.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.vocab_size)
