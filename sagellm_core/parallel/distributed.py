"""One engine over several processes (torch.distributed): rank 0 plans and samples, the other ranks
run their part of each step on their own device.

Two layouts:

* Tensor parallel (``parallel.tensor_parallel_size: N``): every rank holds a shard of every layer
  (`sagellm_core.parallel.tensor_parallel.shard_model`) and the KV of its own key/value heads. Rank 0
  sends each step's plan to the others, all run it (one all-reduce per attention and MLP block), and
  rank 0 samples from its logits (the LM head is replicated).
* Prefill/decode split (``parallel.pd_split: true``, with the ``pd`` scheduler in ``strict`` mode):
  rank 0 holds the prefill pool and rank 1 the decode pool, each with the whole model on its own
  device. When a request's prompt is done, its blocks are sent from rank 0 to rank 1
  (``torch.distributed`` send/recv); decode steps run on rank 1, which sends their logits back.

The plan (plain data) travels over a gloo group whatever the device; tensors (all-reduces, KV blocks,
logits) over the backend's own collective library (NCCL on CUDA, HCCL/CNCL/RCCL for the vendor
plugins, gloo on the CPU). Rank 0 starts the other ranks itself (``spawn``), unless the processes were
started by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set): then every rank runs the same
command and ranks above 0 serve as workers inside the engine's construction.
Distributed layouts run at pipeline depth 0 (no async scheduling).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import attrs
import torch
import torch.distributed as dist

from sagellm_core.plan import StepPlan

log = logging.getLogger("sagellm")


@attrs.frozen
class World:
    """This process's place among the engine's processes."""

    rank: int
    size: int
    local_rank: int
    external: bool  # started by torchrun (or another launcher that set the environment)


def external_world() -> World | None:
    """The world a launcher such as torchrun described in the environment, if any."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return World(rank, size, int(os.environ.get("LOCAL_RANK", rank)), external=True)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ControlPlane:
    """Rank 0 -> every rank: picklable plain data (plans, start-up facts, stop) over a gloo group."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")

    def send(self, message: Any) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


def _without_transfers(plan: StepPlan) -> StepPlan:
    return attrs.evolve(plan, transfers=[])


class RankZeroRunner:
    """Rank 0's runner in a multi-process layout: wraps the local `ModelRunner`, tells the workers
    what to run, and stops them on `release`."""

    def __init__(self, runner: Any, control: ControlPlane) -> None:
        self.runner = runner
        self.control = control

    @property
    def captures_graphs(self) -> bool:
        return bool(self.runner.captures_graphs)

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return list(self.runner.kv_caches)

    @property
    def num_forward_tokens(self) -> int:
        return int(self.runner.num_forward_tokens)

    def replays_graph(self, plan: StepPlan) -> bool:
        return bool(self.runner.replays_graph(plan))

    def release(self) -> None:
        """Stop the workers, drop this rank's KV and graphs, and leave the process group."""
        self.control.send(("stop",))
        self.runner.release()
        dist.destroy_process_group()


class TensorParallelRunner(RankZeroRunner):
    """Each plan goes to every rank, then runs here too."""

    def execute(self, plan: StepPlan, feed: Any = None, replay: bool | None = None) -> torch.Tensor:
        if feed is not None:
            raise RuntimeError("tensor-parallel steps run at pipeline depth 0 (no tokens fed from the device)")
        if replay is None:
            replay = self.replays_graph(plan)
        self.control.send(("step", plan, replay))
        return self.runner.execute(plan, None, replay=replay)


class SplitPoolRunner(RankZeroRunner):
    """The decode pool lives on rank 1: prefill runs here, transfers send the prefilled blocks to
    rank 1, decode steps run there and their logits come back."""

    def __init__(self, runner: Any, control: ControlPlane, decode_pool: int = 1, peer: int = 1) -> None:
        super().__init__(runner, control)
        self.decode_pool = decode_pool
        self.peer = peer
        self.bytes_sent = 0
        self.remote_forward_tokens = 0

    @property
    def num_forward_tokens(self) -> int:
        return int(self.runner.num_forward_tokens) + self.remote_forward_tokens

    def replays_graph(self, plan: StepPlan) -> bool:
        return plan.pool != self.decode_pool and bool(self.runner.replays_graph(plan))

    def execute(self, plan: StepPlan, feed: Any = None, replay: bool | None = None) -> torch.Tensor:
        if feed is not None:
            raise RuntimeError("split prefill/decode steps run at pipeline depth 0")
        self.control.send(("step", plan, None))
        for transfer in plan.transfers:
            self.bytes_sent += send_blocks(self.runner.kv_caches[transfer.src_pool], transfer.src_blocks, self.peer)
        if plan.pool == self.decode_pool:
            if not plan.chunks:
                return torch.empty((0, 0))
            self.remote_forward_tokens += plan.num_tokens
            return receive_logits(self.peer, self.runner.device)
        return self.runner.execute(_without_transfers(plan), None, replay=replay)


def send_blocks(pool: torch.Tensor, blocks: list[int], peer: int) -> int:
    """Send the K/V of ``blocks`` (all layers) to ``peer``; returns the bytes sent."""
    index = torch.tensor(blocks, device=pool.device)
    payload = pool[:, :, index].contiguous()
    dist.send(payload, dst=peer)
    return payload.numel() * payload.element_size()


def receive_blocks(pool: torch.Tensor, blocks: list[int], peer: int) -> None:
    """Receive the K/V of ``len(blocks)`` blocks from ``peer`` into ``blocks`` of ``pool``."""
    shape = list(pool.shape)
    shape[2] = len(blocks)
    payload = torch.empty(shape, dtype=pool.dtype, device=pool.device)
    dist.recv(payload, src=peer)
    pool[:, :, torch.tensor(blocks, device=pool.device)] = payload


def send_logits(logits: torch.Tensor, peer: int) -> None:
    dist.send(torch.tensor(list(logits.shape), dtype=torch.int64, device=logits.device), dst=peer)
    dist.send(logits.contiguous(), dst=peer)


def receive_logits(peer: int, device: torch.device) -> torch.Tensor:
    shape = torch.empty(2, dtype=torch.int64, device=device)
    dist.recv(shape, src=peer)
    logits = torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=device)
    dist.recv(logits, src=peer)
    return logits


def serve_steps(runner: Any, control: ControlPlane, layout: str, decode_pool: int = 1) -> None:
    """A worker's loop: run (its part of) each plan rank 0 sends, until told to stop."""
    while True:
        message = control.receive()
        if message[0] == "stop":
            runner.release()
            return
        _, plan, replay = message
        with torch.inference_mode():
            if layout == "tensor":
                runner.execute(plan, None, replay=replay)
                continue
            for transfer in plan.transfers:
                receive_blocks(runner.kv_caches[transfer.dst_pool], transfer.dst_blocks[: len(transfer.src_blocks)], 0)
            if plan.pool == decode_pool and plan.chunks:
                send_logits(runner.execute(_without_transfers(plan), None), 0)
