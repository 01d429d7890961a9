"""Token sampling for a batch, as batched device work: bans and ``logit_bias`` (`masks`),
penalties over device token counts (`penalties`), top-k / top-p / min-p without a vocabulary sort
(`filters`), logprobs on the device (`logprobs`), the draw with per-row keys (`draw`, `seeds`)."""

from sagellm_core.sampling.draw import FusedSampler
from sagellm_core.sampling.logprobs import Logprobs
from sagellm_core.sampling.sampler import PendingSample, SampleResult, Sampler
from sagellm_core.sampling.seeds import GREEDY_EPSILON, is_greedy, mix64, request_seed, seed63

__all__ = ["GREEDY_EPSILON", "FusedSampler", "Logprobs", "PendingSample", "SampleResult", "Sampler", "is_greedy",
           "mix64", "request_seed", "seed63"]
