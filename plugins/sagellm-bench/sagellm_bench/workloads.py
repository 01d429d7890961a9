"""Seeded benchmark workloads: random token-id prompts, shared-prefix groups, Poisson arrival times.

Everything is drawn from ``random.Random(seed)`` so two runs (or two engines in one run) see the
same requests.
"""

from __future__ import annotations

import math
import random

import attrs


@attrs.frozen
class BenchRequest:
    """One request of a workload: prompt token ids and the exact number of tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@attrs.frozen
class Workload:
    """A named list of requests plus the parameters that generated it (recorded in the JSON)."""

    name: str
    requests: list[BenchRequest]
    params: dict[str, object] = attrs.field(factory=dict)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    def describe(self) -> str:
        """One line for the printed report."""
        n = len(self.requests)
        return (f"{self.name}: {n} requests, {self.num_prompt_tokens} prompt tokens "
                f"(mean {self.num_prompt_tokens / max(n, 1):.0f}), {self.num_output_tokens} output tokens "
                f"(mean {self.num_output_tokens / max(n, 1):.0f}), "
                + ", ".join(f"{k}={v}" for k, v in self.params.items()))


def _check_range(name: str, low: int, high: int) -> None:
    if low < 1 or high < low:
        raise ValueError(f"{name}: need 1 <= min <= max, got {low}..{high}")


def random_workload(num_requests: int, input_len: tuple[int, int], output_len: tuple[int, int],
                    vocab_size: int, seed: int = 0) -> Workload:
    """nano-vllm's bench.py workload: prompt ids uniform in [0, vocab), lengths uniform in the ranges."""
    _check_range("input length", *input_len)
    _check_range("output length", *output_len)
    rng = random.Random(seed)
    # NOTE: all prompts first, then all output lengths -- nano-vllm's draw order.
    prompts = [[rng.randint(0, vocab_size - 1) for _ in range(rng.randint(*input_len))]
               for _ in range(num_requests)]
    requests = [BenchRequest(prompt, rng.randint(*output_len)) for prompt in prompts]
    params = {"input_len": f"{input_len[0]}..{input_len[1]}", "output_len": f"{output_len[0]}..{output_len[1]}",
              "vocab_size": vocab_size, "seed": seed}
    return Workload("random", requests, params)


def fixed_workload(num_requests: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0
                   ) -> Workload:
    """Requests of exactly ``input_len`` random prompt tokens and ``output_len`` outputs (latency)."""
    workload = random_workload(num_requests, (input_len, input_len), (output_len, output_len), vocab_size, seed)
    return attrs.evolve(workload, name="fixed")


def shared_prefix_workload(num_groups: int, requests_per_group: int, prefix_len: int, suffix_len: int,
                           output_len: int, vocab_size: int, seed: int = 0) -> Workload:
    """``num_groups`` system prompts of ``prefix_len`` tokens, each followed by unique suffixes.

    Requests are interleaved round-robin over the groups (g0 r0, g1 r0, ..., g0 r1, ...), the way
    independent users of a few shared system prompts arrive.
    """
    _check_range("prefix length", prefix_len, prefix_len)
    _check_range("suffix length", suffix_len, suffix_len)
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab_size) for _ in range(prefix_len)] for _ in range(num_groups)]
    requests = []
    for _ in range(requests_per_group):
        for prefix in prefixes:
            suffix = [rng.randrange(vocab_size) for _ in range(suffix_len)]
            requests.append(BenchRequest(prefix + suffix, output_len))
    params = {"groups": num_groups, "requests_per_group": requests_per_group, "prefix_len": prefix_len,
              "suffix_len": suffix_len, "output_len": output_len, "seed": seed}
    return Workload("shared_prefix", requests, params)


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds (first at 0) of a Poisson process of ``rate`` req/s; inf: all at 0."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for index in range(num_requests):
        if index:
            now += rng.expovariate(rate)
        offsets.append(now)
    return offsets


WORDS = ("the of and to in is was that for on with as by at from his her this which or an be are "
         "time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government").split()


def random_text(num_words: int, rng: random.Random) -> str:
    """``num_words`` words drawn from a fixed list (text prompts for servers without token-id input)."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))
