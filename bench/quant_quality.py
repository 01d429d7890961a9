"""Quality of the CPU quantized paths with the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF):
perplexity on transformers' LICENSE text and greedy continuations of fixed prompts, against fp32.

    python bench/quant_quality.py [--tokens 4096] [--new-tokens 16]

Targets (issue 15): int8 perplexity within 2% of fp32, int4 within 6%; greedy output identical to
fp32 on at least half of the prompts.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sagellm_core.builtin.cpu_backend import CPUBackend
from sagellm_core.models import loader
from sagellm_core.quant import quantize_model
from sagellm_core.quant.quality import PROMPTS, greedy, license_text, perplexity

METHODS = {"int8": 0.02, "gguf": 0.06, "int4": 0.06}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="at most this many tokens of the text")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()

    source = loader.resolve(None)
    tokenizer = loader.load_tokenizer(source)
    base = loader.load_model(source, torch.float32, torch.device("cpu"))
    ids = tokenizer(license_text()).input_ids[: args.tokens]
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    models = {"none": base}
    for method in args.methods:
        models[method] = copy.deepcopy(base)
        report = quantize_model(models[method], method, CPUBackend(), torch.float32, source.gguf_path)
        print(f"{method}: {report.summary()}")
    print(f"text: transformers' LICENSE, {len(ids)} tokens; {len(prompts)} prompts x {args.new_tokens} greedy tokens")
    reference_ppl = None
    reference_out: list[list[int]] = []
    ok = True
    for method, model in models.items():
        start = time.perf_counter()
        ppl = perplexity(model, ids)
        outs = [greedy(model, p, args.new_tokens) for p in prompts]
        if reference_ppl is None:
            reference_ppl, reference_out = ppl, outs
            print(f"{method:>5}: perplexity {ppl:.4f}  ({time.perf_counter() - start:.0f} s)")
            continue
        same = [i for i, (a, b) in enumerate(zip(outs, reference_out)) if a == b]
        delta = ppl / reference_ppl - 1.0
        bound = METHODS.get(method, 0.06)
        ok &= abs(delta) <= bound and 2 * len(same) >= len(prompts)
        print(f"{method:>5}: perplexity {ppl:.4f} ({delta:+.2%} vs fp32, bound {bound:.0%}); greedy identical on "
              f"{len(same)}/{len(prompts)} prompts: {[PROMPTS[i] for i in same]}  ({time.perf_counter() - start:.0f} s)")
    print("targets met" if ok else "TARGETS MISSED")


if __name__ == "__main__":
    main()
