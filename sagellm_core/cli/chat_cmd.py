"""`sagellm chat`: an interactive chat using the model's chat template."""

from __future__ import annotations

import argparse
import sys

from sagellm_core.cli.common import add_engine_options, engine_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="interactive chat (empty line or Ctrl-D to quit)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    add_engine_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sagellm_core.llm import LLM
    from sagellm_core.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with LLM(config=engine_config(args)) as llm:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            sys.stdout.write("assistant> ")
            reply = ""
            for output in llm.chat(messages, params):
                sys.stdout.write(output.outputs[0].delta_text)
                sys.stdout.flush()
                reply = output.outputs[0].text
            print()
            messages.append({"role": "assistant", "content": reply})
    return 0
