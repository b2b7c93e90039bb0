"""More than one process (``torchrun --nproc_per_node N -m v3kit run ...``): exact data parallelism.

Every rank reads the same global batch (the same seeded shuffle, the same sampling draws, the same batch-wide
statistics) and runs the towers, with autograd, on its own contiguous slice of the batch's rows only. The ranks
then all-gather the slices' embeddings, so each holds the whole batch's embeddings (its own rows with their graph,
the others' as constants) and evaluates the loss of the whole batch exactly as one process would, then
backpropagates: the gradient reaches its own rows alone. The gradient of the batch loss is the sum of those
per-slice gradients, so after an all-reduce (sum) every rank holds the single-process gradient and takes the same
optimizer step. Nothing about the loss, its normaliser or its statistics has to know about ranks, which is why
every switch (``adv_scale: batch``, ``samples: sampled``, the exact group KL, ...) stays exact. Only rank 0 writes
files; checkpoints do not depend on the world size, so a run resumes under another one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as tdist
from torch import Tensor, nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` batch rows (possibly empty)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)


_CURRENT = Dist()


def current() -> Dist:
    return _CURRENT


def init_from_env(device: torch.device | str = "cpu") -> Dist:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA); one process
    (no ``WORLD_SIZE`` or 1) needs nothing."""
    global _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CURRENT = Dist()
        return _CURRENT
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    _CURRENT = Dist(tdist.get_rank(), tdist.get_world_size())
    return _CURRENT


def barrier() -> None:
    """Wait for every rank (files rank 0 wrote are complete after it)."""
    if _CURRENT.world > 1:
        tdist.barrier()


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum the ranks' gradients in place (one flat all-reduce); a parameter without a gradient counts as zeros."""
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    tdist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def gather_rows(own: Tensor, n: int, dist: Dist) -> Tensor:
    """The ``n`` rows of a batch from every rank's contiguous share (``own`` is this rank's, and keeps its graph;
    the other ranks' rows arrive as constants). Shares may differ by a row, so each is padded to the largest."""
    shares = [Dist(r, dist.world).rows(n) for r in range(dist.world)]
    sizes = [share.stop - share.start for share in shares]
    width = max(sizes)
    sent = own.detach()
    if sent.shape[0] < width:
        sent = torch.cat([sent, sent.new_zeros((width - sent.shape[0], *sent.shape[1:]))])
    parts = [torch.empty_like(sent) for _ in range(dist.world)]
    tdist.all_gather(parts, sent.contiguous())
    pieces = [own if r == dist.rank else parts[r][: sizes[r]] for r in range(dist.world)]
    return torch.cat(pieces)
