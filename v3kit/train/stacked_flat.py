"""The parameters, gradient clipping and Adam of K stacked members (:mod:`v3kit.train.stacked`): one home for what
every stacked model shares, whatever computes its forward pass (:class:`~v3kit.train.stacked_towers.StackedTowers`'
batched matmuls, :class:`~v3kit.train.stacked_func.StackedFunc`'s ``torch.vmap``).

The trainable parameters of the K members live side by side in one flat buffer ``[K, P]`` (member ``k``'s row holds
its parameters in ``named_parameters`` order), and so do their gradients and Adam's two moments; clipping is a
handful of operations on the whole buffer and Adam one pass of torch's fused Adam kernel over the members' rows, each
member with its own learning rate, clipping norm and step count.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

# The parameters are views of one [K, P] buffer and so are their gradients (written in place by autograd); torch
# warns that such strides may be slow for a general layer, which batched matmuls do not mind.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which every stage uses
ADAM_EPS = 1e-8


class AdamSnapshot(NamedTuple):
    exp_avg: Tensor  # [K, P]
    exp_avg_sq: Tensor  # [K, P]
    steps: list[int]


class FlatStack:
    """K members' trainable parameters ``named`` (member 0's, in ``named_parameters`` order) as views of one flat
    buffer: ``params[name]`` is ``[K, *shape]`` (``[K, *shape[::-1]]`` for a name in ``transposed``), its ``grad``
    a view of :attr:`grad`, where autograd accumulates in place."""

    def __init__(self, k: int, named: Sequence[tuple[str, Tensor]], transposed: Iterable[str] = ()) -> None:
        self.k = k
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        sizes = [p.numel() for _, p in named]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        p0 = named[0][1]
        self.data = torch.empty(self.k, sum(sizes), device=p0.device, dtype=p0.dtype)
        self.grad = torch.zeros_like(self.data)
        self.exp_avg = torch.zeros_like(self.data)
        self.exp_avg_sq = torch.zeros_like(self.data)
        self.steps = [0] * self.k  # Adam's step count per member (a skipped batch does not count)
        # each member's row of the four buffers, as the per-parameter tensor lists the fused Adam kernel takes
        self._row_lists = [list(t.unbind(0)) for t in (self.data, self.grad, self.exp_avg, self.exp_avg_sq)]
        self.transposed = set(transposed)
        self.params: dict[str, Tensor] = {}
        for name, shape, off, size in zip(self.names, self.shapes, self.offsets, sizes):
            stored = shape[::-1] if name in self.transposed else shape
            view = self.data[:, off : off + size].view(self.k, *stored)
            view.requires_grad_()
            view.grad = self.grad[:, off : off + size].view(self.k, *stored)  # autograd accumulates in place
            self.params[name] = view

    # ------------------------------------------------------------------ members <-> stack
    def member(self, name: str, k: int, stacked: Tensor | None = None) -> Tensor:
        """Member ``k``'s slice of parameter ``name`` (or of its gradient, ``stacked=tower.params[name].grad``) in
        the member's own layout (a view)."""
        view = (self.params[name] if stacked is None else stacked)[k]
        return view.T if name in self.transposed else view

    @torch.no_grad()
    def from_members(self, members: Sequence[nn.Module], which: Sequence[int] | None = None) -> None:
        """Copy the members' weights into the stack (all, or the indices ``which``)."""
        for k in range(self.k) if which is None else which:
            own = dict(members[k].named_parameters())
            for name in self.names:
                self.member(name, k).copy_(own[name])

    @torch.no_grad()
    def to_members(self, members: Sequence[nn.Module]) -> None:
        """Copy the stacked weights into each member's own module."""
        for k, m in enumerate(members):
            own = dict(m.named_parameters())
            for name in self.names:
                own[name].copy_(self.member(name, k))

    def _state_slice(self, buf: Tensor, k: int, name: str, shape: tuple[int, ...], off: int) -> Tensor:
        n = math.prod(shape)
        flat = buf[k, off : off + n]
        return flat.view(shape[::-1]).T if name in self.transposed else flat.view(shape)

    def adam_snapshot(self) -> AdamSnapshot:
        """Every member's Adam state as it is now (two copies of the stack's moments), for :meth:`adam_state` to
        split into members later: the epoch checkpoints are built on the writer thread while the stack trains on."""
        return AdamSnapshot(self.exp_avg.clone(), self.exp_avg_sq.clone(), list(self.steps))

    def adam_state(self, k: int, snapshot: AdamSnapshot | None = None) -> list[dict[str, Tensor]]:
        """Member ``k``'s Adam state per parameter, as ``torch.optim.Adam.state`` holds it (copies), now or as it
        was at ``snapshot``."""
        snap = AdamSnapshot(self.exp_avg, self.exp_avg_sq, self.steps) if snapshot is None else snapshot
        out = []
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            out.append(
                {
                    "step": torch.tensor(float(snap.steps[k])),
                    "exp_avg": self._state_slice(snap.exp_avg, k, name, shape, off).clone(
                        memory_format=torch.contiguous_format
                    ),
                    "exp_avg_sq": self._state_slice(snap.exp_avg_sq, k, name, shape, off).clone(
                        memory_format=torch.contiguous_format
                    ),
                }
            )
        return out

    @torch.no_grad()
    def load_adam_state(self, k: int, state: list[dict[str, Tensor]]) -> None:
        """Put member ``k``'s Adam state (:meth:`adam_state`'s layout; empty: a fresh optimizer) into the stack."""
        if not state:
            self.exp_avg[k].zero_()
            self.exp_avg_sq[k].zero_()
            self.steps[k] = 0
            return
        for s, name, shape, off in zip(state, self.names, self.shapes, self.offsets):
            self._state_slice(self.exp_avg, k, name, shape, off).copy_(s["exp_avg"])
            self._state_slice(self.exp_avg_sq, k, name, shape, off).copy_(s["exp_avg_sq"])
        self.steps[k] = int(float(state[0]["step"]))

    # ------------------------------------------------------------------ optimisation
    def zero_grad(self) -> None:
        self.grad.zero_()

    @torch.no_grad()
    def clip(self, max_norms: Tensor) -> Tensor:
        """Scale each member's gradient to at most ``max_norms[k]`` (inf: no clipping), as ``clip_grad_norm_`` does
        per model; returns the norms before clipping ``[K]``."""
        norms = torch.linalg.vector_norm(self.grad, dim=1)
        coef = torch.clamp(max_norms / (norms + 1e-6), max=1.0)
        self.grad.mul_(coef.unsqueeze(1))
        return norms

    @torch.no_grad()
    def adam_step(self, lrs: Sequence[float], frozen: Sequence[bool], weight_decays: Sequence[float] = ()) -> None:
        """One ``torch.optim.Adam(fused=True)`` step of every member not ``frozen``: torch's fused Adam kernel, one
        pass over the members' rows (the nine passes of the single-tensor update made a 384-d stack's Adam 2-2.5x
        slower over a run), each member with its own learning rate, ``weight_decay`` (Adam's L2 term) and
        step count. Frozen members (a skipped batch, a pruned or failed member) keep weights and state. The fused
        kernel rounds a little differently from the single-tensor Adam a run alone takes on a CPU: float32
        rounding, inside what the stacked runs are tested to."""
        wds = list(weight_decays) or [0.0] * self.k
        groups: dict[tuple[float, float], list[int]] = {}  # the kernel takes one lr and weight decay per call
        for k in range(self.k):
            if not frozen[k]:
                self.steps[k] += 1
                groups.setdefault((float(lrs[k]), float(wds[k])), []).append(k)
        if not groups:
            return
        # the kernel reads each row's step (already counted) from a float32 tensor, as Adam's state holds it
        steps = torch.tensor(self.steps, dtype=torch.float32, device=self.data.device).unbind(0)
        data, grad, exp_avg, exp_avg_sq = self._row_lists
        beta1, beta2 = ADAM_BETAS
        for (lr, wd), ks in groups.items():
            torch._fused_adam_(
                [data[k] for k in ks],
                [grad[k] for k in ks],
                [exp_avg[k] for k in ks],
                [exp_avg_sq[k] for k in ks],
                [],
                [steps[k] for k in ks],
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=ADAM_EPS,
                amsgrad=False,
                maximize=False,
            )
