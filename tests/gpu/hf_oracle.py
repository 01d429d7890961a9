"""transformers as the oracle for the GPU tests: greedy generation and an agreement score."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_greedy(model_dir: Path, prompts: list[list[int]], dtype: torch.dtype, max_new: int, batch: int = 1,
              device: str = "cuda") -> list[list[int]]:
    """Greedy continuations of exactly ``max_new`` tokens, ``batch`` prompts at a time (left padded)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    outs: list[list[int]] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            group = prompts[i:i + batch]
            width = max(map(len, group))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
            outs += gen[:, width:].tolist()
    return outs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each sequence generated before the two first differ."""
    total = 0.0
    for x, y in zip(a, b):
        same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        total += same / len(x)
    return total / len(a)
