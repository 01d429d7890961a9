"""CUDA graph capture for the core's decode graph runner (`sagellm_core.models.graphs`)."""

from __future__ import annotations

from typing import Callable

import torch


class CUDAGraphCapture:
    """Captures a function's kernels into a `torch.cuda.CUDAGraph`; all graphs share one memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.num_graphs = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        self.num_graphs += 1

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay
