"""The architecture parity set on the CUDA backend: the Triton op implements sliding windows but not
attention sinks nor logit soft-capping, so gpt-oss and soft-capped Gemma 2 are refused at load naming
the feature; the other architectures generate what transformers generates (fp32 greedy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import model_zoo
from conftest import engine_config, run_engine
from hf_oracle import hf_greedy
from sagellm_core.engine import LLMEngine
from sagellm_core.models.support import UnsupportedModelError
from sagellm_core.sampling_params import SamplingParams
from test_model_coverage import IDENTICAL, MAX_NEW, make_prompts

pytestmark = pytest.mark.gpu
NEEDS_MISSING_FEATURE = {"gpt_oss": r"attention sinks \(s_aux\)", "gemma2": r"attention logit soft-capping \(softcap\)"}


def cuda_config(directory: Path) -> object:
    return engine_config(directory, backend={"name": "cuda"}, kv_cache={"block_size": 16, "num_blocks": 64},
                         scheduler={"max_num_batched_tokens": 8})


def test_the_triton_op_declares_the_sliding_window_only() -> None:
    from sagellm_cuda.attention import triton_paged_attention
    from sagellm_core.attention.features import op_features

    assert op_features(triton_paged_attention) == {"sliding_window"}


@pytest.mark.parametrize("arch", sorted(NEEDS_MISSING_FEATURE))
def test_models_needing_sinks_or_soft_cap_are_refused_on_cuda(arch: str, tmp_path: Path) -> None:
    directory = model_zoo.save_model(arch, tmp_path / arch)
    with pytest.raises(UnsupportedModelError, match=f"'cuda' backend: it needs {NEEDS_MISSING_FEATURE[arch]}"):
        LLMEngine(cuda_config(directory))


@pytest.mark.parametrize("arch", [a for a in IDENTICAL if a not in NEEDS_MISSING_FEATURE])
def test_architecture_is_token_identical_on_cuda(arch: str, tmp_path: Path) -> None:
    directory = model_zoo.save_model(arch, tmp_path / arch)
    prompts = make_prompts()
    engine = model_zoo.engine_unless_class_refused(cuda_config(directory))
    expected = hf_greedy(directory, prompts, torch.float32, MAX_NEW)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in run_engine(engine, prompts[:3], params) + run_engine(engine, prompts[3:], params)]
    assert got == expected
