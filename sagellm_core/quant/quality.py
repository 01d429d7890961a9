"""Quality checks of a quantized model against its float twin: perplexity on a fixed text that ships
with a dependency (transformers' Apache-2.0 LICENSE, about 2.6k tokens for SmolLM2's tokenizer) and
greedy continuations of fixed prompts."""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import torch

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "The largest planet in our solar system is",
    "To make a cup of tea, first",
    "The theory of relativity was developed by",
)


def license_text(distribution: str = "transformers") -> str:
    """The LICENSE file of an installed distribution (its dist-info copy)."""
    files = metadata.distribution(distribution).files or []
    for path in files:
        if path.name == "LICENSE":
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"{distribution} ships no LICENSE file in its metadata")


@torch.inference_mode()
def perplexity(model: Any, ids: list[int], window: int = 1024) -> float:
    """exp(mean negative log-likelihood) of ``ids`` in non-overlapping windows (each predicts its own
    tokens from the window's earlier ones)."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window]])
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum")
        total += float(nll)
        count += chunk.shape[1] - 1
    return math.exp(total / count)


@torch.inference_mode()
def greedy(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` greedy tokens after ``ids`` (full forward per token: no cache to get wrong)."""
    seq = list(ids)
    for _ in range(new_tokens):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids):]
