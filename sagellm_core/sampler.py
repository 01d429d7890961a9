"""Compatibility name of `sagellm_core.sampling` (the sampler package)."""

from sagellm_core.sampling import (GREEDY_EPSILON, FusedSampler, Logprobs, PendingSample, SampleResult, Sampler,
                                   is_greedy, mix64, request_seed, seed63)

_mix64 = mix64

__all__ = ["GREEDY_EPSILON", "FusedSampler", "Logprobs", "PendingSample", "SampleResult", "Sampler", "is_greedy",
           "request_seed", "seed63"]
