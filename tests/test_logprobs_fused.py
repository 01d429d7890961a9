"""Logprobs through a backend's one-pass op (`Backend.fused_logprobs`) and without one: the torch
path gives what it gave before the op existed, an op's results are what the host reads, an op that
declines leaves the torch path, and (where Triton is installed) the CUDA kernel run through Triton's
CPU interpreter against torch."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import sagellm_core.sampling.sampler as sampler_module
from conftest import engine_config, run_engine
from sagellm_core.builtin.cpu_backend import CPUBackend
from sagellm_core.config import BackendConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.request import Request
from sagellm_core.sampler import Sampler
from sagellm_core.sampling.logprobs import (
    LogprobParts,
    LogprobTensors,
    logprob_tensors,
    read_logprobs,
    torch_logprobs,
)
from sagellm_core.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def previous_logprob_tensors(logits: torch.Tensor, requests: list[Request]) -> LogprobTensors | None:
    """`logprob_tensors` as it was before backends could pass a one-pass op (the reference)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if not rows:
        return None
    counts = [int(requests[i].params.logprobs or 0) for i in rows]
    if len(rows) != len(requests):
        logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True))
    normalizer = logits.logsumexp(dim=-1, keepdim=True)
    width = max(counts)
    if width:
        top_values, top_ids = logits.topk(width, dim=-1)
        top_values = top_values - normalizer
    else:
        top_values = logits.new_empty((len(rows), 0))
        top_ids = torch.empty((len(rows), 0), dtype=torch.int64, device=logits.device)
    return LogprobTensors(rows, counts, logits, normalizer, top_values, top_ids)


def _request(rid: str, logprobs: int | None, temperature: float = 0.0) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(temperature=temperature, logprobs=logprobs), max_tokens=100)


def _read(info: LogprobTensors | None, tokens: torch.Tensor, rows: int) -> list[Any]:
    if info is not None:
        info.choose(tokens)
    return read_logprobs(info, lambda t: t.tolist, rows)()


class RecordingOp:
    """Stands in for a backend's op: records its inputs, answers with torch's results shifted by
    ``offset`` (so the test sees whose numbers were read), or declines with None."""

    def __init__(self, offset: float = 0.0, decline: bool = False) -> None:
        self.offset, self.decline = offset, decline
        self.calls: list[tuple[torch.Tensor, int]] = []

    def __call__(self, logits: torch.Tensor, n: int) -> LogprobParts | None:
        self.calls.append((logits.clone(), n))
        if self.decline:
            return None
        normalizer, values, ids = torch_logprobs(logits, n)
        return normalizer - self.offset, values + self.offset, ids


MIXES = [[3, None, 0], [5, 5], [0], [None, 20, 1, None]]


@pytest.mark.parametrize("asked", MIXES)
def test_without_an_op_the_torch_path_is_unchanged(asked: list[int | None]) -> None:
    torch.manual_seed(1)
    logits = torch.randn(len(asked), 300) * 3
    requests = [_request(str(i), n) for i, n in enumerate(asked)]
    new, old = logprob_tensors(logits, requests), previous_logprob_tensors(logits, requests)
    assert new is not None and old is not None and (new.rows, new.counts) == (old.rows, old.counts)
    for a, b in [(new.normalizer, old.normalizer), (new.top_values, old.top_values), (new.top_ids, old.top_ids)]:
        assert a.dtype == b.dtype and torch.equal(a, b)
    tokens = logits.argmax(dim=-1)
    assert _read(new, tokens, len(asked)) == _read(old, tokens, len(asked))
    assert logprob_tensors(logits, [_request("x", None)] * len(asked)) is None


def test_the_engine_without_an_op_reports_the_previous_logprobs(tiny_models: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU engine (no fused logprobs) reports exactly what the previous function gave."""
    config = engine_config(tiny_models["qwen3"])
    prompts = [[1, 5, 9, 2], [3, 3, 8], [7, 1]]
    asked = [SamplingParams(max_tokens=6, logprobs=n, temperature=t, seed=4, ignore_eos=True)
             for n, t in ((3, 0.0), (0, 0.8), (5, 1.0))]

    def run() -> list[Any]:
        engine = LLMEngine(config)
        return [[(e.token_id, e.logprob, [(t, lp) for t, _, lp in e.top]) for e in run_engine(engine, [p], s)[0]
                 .outputs[0].logprobs] for p, s in zip(prompts, asked)]

    now = run()

    def previous(logits: torch.Tensor, requests: list[Request], fused: object = None) -> LogprobTensors | None:
        assert fused is None  # the CPU backend has no op
        return previous_logprob_tensors(logits, requests)

    monkeypatch.setattr(sampler_module, "logprob_tensors", previous)
    assert now == run()
    assert all(len(steps) == 6 for steps in now) and [len(now[i][0][2]) for i in range(3)] == [3, 0, 5]


def test_an_op_gives_the_logprobs_the_host_reads() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 200)
    requests = [_request("a", 2), _request("b", None), _request("c", 4), _request("d", None)]
    op = RecordingOp(offset=10.0)
    info = logprob_tensors(logits, requests, op)
    assert len(op.calls) == 1 and op.calls[0][1] == 4 and torch.equal(op.calls[0][0], logits[[0, 2]])
    tokens = torch.tensor([5, 0, 7, 0])
    read = _read(info, tokens, 4)
    expected = _read(logprob_tensors(logits, requests), tokens, 4)
    assert read[1] is None and read[3] is None
    for got, want in ((read[0], expected[0]), (read[2], expected[2])):
        assert got[0] == pytest.approx(want[0] + 10.0)  # chosen: logit - the op's normaliser
        assert got[1] == want[1]
        assert got[2] == pytest.approx([v + 10.0 for v in want[2]])
    assert len(read[0][1]) == 2 and len(read[2][1]) == 4


def test_an_op_that_declines_leaves_the_torch_path() -> None:
    logits = torch.randn(2, 100)
    requests = [_request("a", 3), _request("b", 0)]
    op = RecordingOp(decline=True)
    tokens = torch.tensor([1, 2])
    fused, plain = logprob_tensors(logits, requests, op), logprob_tensors(logits, requests)
    assert _read(fused, tokens, 2) == _read(plain, tokens, 2)
    assert len(op.calls) == 1


def test_only_chosen_logprobs_go_through_the_op_with_n_zero() -> None:
    logits = torch.randn(2, 100)
    op = RecordingOp()
    read = _read(logprob_tensors(logits, [_request("a", 0), _request("b", 0)], op), torch.tensor([4, 9]), 2)
    assert op.calls[0][1] == 0
    assert read == [(pytest.approx(float(logits[0].log_softmax(-1)[4])), [], []),
                    (pytest.approx(float(logits[1].log_softmax(-1)[9])), [], [])]


def test_the_sampler_hands_its_op_the_processed_logits() -> None:
    """With the backend's op (``Sampler(fused_logprobs=...)``), the logits it gets are those
    logprobs report: after bias and penalties; the numbers read are the op's."""
    op = RecordingOp(offset=1.0)
    sampler = Sampler(fused_logprobs=op)
    logits = torch.randn(2, 50)
    biased = Request("a", [1], SamplingParams(temperature=0.0, logprobs=3, logit_bias={4: 3.0}), max_tokens=9)
    result = sampler.sample(logits, [biased, _request("b", None)])
    expected = logits[:1].clone()
    expected[0, 4] += 3.0
    assert len(op.calls) == 1 and op.calls[0][1] == 3 and torch.allclose(op.calls[0][0], expected)
    chosen, top_ids, _ = result.logprobs[0]  # type: ignore[misc]
    reference = expected[0].log_softmax(-1)
    assert chosen == pytest.approx(float(reference.max()) + 1.0) and result.logprobs[1] is None
    assert top_ids == reference.topk(3).indices.tolist()


def test_the_cpu_backend_has_no_fused_logprobs() -> None:
    assert CPUBackend().fused_logprobs() is None


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_cuda_fused_logprobs_is_the_triton_kernel_unless_off_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sagellm_cuda.plugin as cuda

    _fake_module(monkeypatch, "triton")
    kernel = _fake_module(monkeypatch, "sagellm_cuda.logprobs")
    kernel.fused_logprobs = lambda logits, n: None  # type: ignore[attr-defined]
    assert cuda.SPEC.create(BackendConfig()).fused_logprobs() is kernel.fused_logprobs
    monkeypatch.setenv("SAGELLM_FUSED_LOGPROBS", "0")
    assert cuda.SPEC.create(BackendConfig()).fused_logprobs() is None
    monkeypatch.delenv("SAGELLM_FUSED_LOGPROBS")
    monkeypatch.setitem(sys.modules, "triton", None)
    assert cuda.SPEC.create(BackendConfig()).fused_logprobs() is None  # torch's logsumexp and topk then


def test_logprobs_kernel_in_the_triton_interpreter() -> None:
    """`tests/logprobs_cases.py` against the kernel on the CPU (about 20 s in the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import numpy

    if tuple(int(p) for p in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip("Triton's interpreter (3.6) cannot take runtime loop bounds with numpy >= 2.4")
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT / "sagellm_cuda"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", "import logprobs_cases; logprobs_cases.main()"],
                            env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0 and "kernel ok" in result.stdout, result.stderr[-3000:]
