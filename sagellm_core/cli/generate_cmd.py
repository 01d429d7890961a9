"""`sagellm generate "prompt"`: stream one answer and print TTFT, TPOT and tokens/s."""

from __future__ import annotations

import argparse
import sys
import time

from sagellm_core.cli.common import add_engine_options, engine_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text for a prompt (streams to stdout)")
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--system", default=None, help="system message (chat template)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_engine_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sagellm_core.chat import chat_prompt_ids
    from sagellm_core.llm import LLM
    from sagellm_core.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    with LLM(config=engine_config(args)) as llm:
        prompt: str | list[int] = args.prompt
        if not args.raw and getattr(llm.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            prompt = chat_prompt_ids(llm.tokenizer, messages + [{"role": "user", "content": args.prompt}])
        start = time.monotonic()
        first = None
        final = None
        for output in llm.generate_stream(prompt, params):
            if first is None and output.outputs[0].token_ids:
                first = time.monotonic()
            sys.stdout.write(output.outputs[0].delta_text)
            sys.stdout.flush()
            final = output
        end = time.monotonic()
    assert final is not None
    print()
    tokens = len(final.outputs[0].token_ids)
    ttft = (first or end) - start
    tpot = (end - (first or end)) / max(tokens - 1, 1)
    print(f"[{tokens} tokens | TTFT {ttft * 1000:.0f} ms | TPOT {tpot * 1000:.1f} ms | "
          f"{tokens / (end - start):.1f} tok/s | finish: {final.outputs[0].finish_reason}]", file=sys.stderr)
    return 0
