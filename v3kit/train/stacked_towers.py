"""K copies of the built-in :class:`~v3kit.model.TwoTower` trained as one: their parameters live side by side in
one flat buffer ``[K, P]`` (member ``k``'s row holds its parameters in ``named_parameters`` order), each layer runs
as one batched matmul (``baddbmm`` over stacked weights ``[K, out, in]``), and Adam and gradient-norm clipping are
a handful of operations on the whole buffer, each member with its own learning rate, clipping norm and step count.

Why: a run of the default world is bound by the fixed cost of each small operation, not by arithmetic; doing K
runs' work in each operation divides that cost by about K (``docs/performance.md``).

The members' own modules stay ordinary ``nn.Module`` objects: :meth:`StackedTowers.to_members` copies the stacked
weights into them before anything reads a member (evaluation, checkpoints, a refresh of GRPO's old policy), and
:meth:`StackedTowers.from_members` copies them back after a resume loaded a member's checkpoint.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from .model import DEFAULT_METHODS, INTERFACE_ATTR, ResidualTower, TwoTower

# The parameters are views of one [K, P] buffer and so are their gradients (written in place by autograd); torch
# warns that such strides may be slow for a general layer, which batched matmuls do not mind.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which every stage uses
ADAM_EPS = 1e-8


def _tower_plan(tower: nn.Module, prefix: str) -> tuple[list[tuple[str, ...]], bool] | str:
    """The layers of one tower as ``("linear", weight, bias)`` / ``("gelu", approximate)`` steps and whether it is
    residual; a string saying why when the tower is not the built-in MLP."""
    residual = isinstance(tower, ResidualTower)
    seq = tower.f if residual else tower
    if not isinstance(seq, nn.Sequential):
        return f"{prefix} is a {type(seq).__name__}, not the built-in MLP"
    plan: list[tuple[str, ...]] = []
    inner = f"{prefix}.f" if residual else prefix
    for i, layer in enumerate(seq):
        if type(layer) is nn.Linear and layer.bias is not None:
            plan.append(("linear", f"{inner}.{i}.weight", f"{inner}.{i}.bias"))
        elif type(layer) is nn.GELU:
            plan.append(("gelu", layer.approximate))
        else:
            return f"{prefix} holds a {type(layer).__name__}"
    return plan, residual


def stack_reason(models: Sequence[nn.Module]) -> str | None:
    """Why ``models`` cannot train as one batched-matmul stack (None: they can): only the built-in ``TwoTower``
    with its default interface, no buffers and the same parameter shapes in every member."""
    first = models[0]
    for m in models:
        if type(m) is not TwoTower:
            return f"the model is a {type(m).__name__}, not the built-in v3kit.model:TwoTower"
        spec = getattr(m, INTERFACE_ATTR, None)
        if spec is not None and (spec.kind != "towers" or spec.query != DEFAULT_METHODS["query"]):
            return "the model is read through a custom interface"
        if any(True for _ in m.buffers()) or getattr(m, "featurize", None) is not None:
            return "the model has buffers or its own featurize"
        shapes = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
        if shapes != [(n, tuple(p.shape)) for n, p in first.named_parameters()] or m.normalize != first.normalize:
            return "the members' models differ in shape"
        if not all(p.requires_grad for p in m.parameters()):
            return "some parameters are frozen"
        for name in ("query_tower", "cand_tower"):
            if isinstance(_tower_plan(getattr(m, name), name), str):
                return str(_tower_plan(getattr(m, name), name))
    return None


class StackedTowers:
    """The stacked parameters, forward pass, clipping and Adam of K built-in two-tower members."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        reason = stack_reason(members)
        if reason is not None:
            raise ValueError(f"cannot stack these models: {reason}")
        template = members[0]
        self.k = len(members)
        named = list(template.named_parameters())
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
        # A linear weight [out, in] is stored transposed, [in, out]: baddbmm then reads it as it lies, and its
        # gradient comes out in that layout (about a fifth less backward time than a transposed view).
        self.transposed = {n for n, shape in zip(self.names, self.shapes) if n.endswith(".weight") and len(shape) == 2}
        self.params: dict[str, Tensor] = {}
        for name, shape, off, size in zip(self.names, self.shapes, self.offsets, sizes):
            stored = shape[::-1] if name in self.transposed else shape
            view = self.data[:, off : off + size].view(self.k, *stored)
            view.requires_grad_()
            view.grad = self.grad[:, off : off + size].view(self.k, *stored)  # autograd accumulates in place
            self.params[name] = view
        self.query_plan, self.residual = _tower_plan(template.query_tower, "query_tower")  # type: ignore[misc]
        self.cand_plan, _ = _tower_plan(template.cand_tower, "cand_tower")  # type: ignore[misc]
        self.normalize = template.normalize
        self.from_members(members)

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

    def adam_state(self, k: int) -> list[dict[str, Tensor]]:
        """Member ``k``'s Adam state per parameter, as ``torch.optim.Adam.state`` holds it (copies)."""
        out = []
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            out.append(
                {
                    "step": torch.tensor(float(self.steps[k])),
                    "exp_avg": self._state_slice(self.exp_avg, k, name, shape, off).clone(
                        memory_format=torch.contiguous_format
                    ),
                    "exp_avg_sq": self._state_slice(self.exp_avg_sq, k, name, shape, off).clone(
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

    # ------------------------------------------------------------------ forward
    def _mlp(self, plan: list[tuple[str, ...]], x: Tensor) -> Tensor:
        for op in plan:
            if op[0] == "linear":
                w, b = self.params[op[1]], self.params[op[2]]
                x = torch.baddbmm(b.unsqueeze(1), x, w)
            else:
                x = nn.functional.gelu(x, approximate=op[1])
        return x

    def _tower(self, plan: list[tuple[str, ...]], x: Tensor) -> Tensor:
        if self.residual:
            return nn.functional.normalize(x + self._mlp(plan, x), dim=-1)
        out = self._mlp(plan, x)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out

    def scores(self, query_x: Tensor, cand_x: Tensor) -> Tensor:
        """Every member's scores ``[K, B, G]`` of its own batch (``query_x [K, B, Dq]``, ``cand_x [K, B, G, Dc]``)."""
        k, b, g, dc = cand_x.shape
        q = self._tower(self.query_plan, query_x)
        c = self._tower(self.cand_plan, cand_x.reshape(k, b * g, dc)).reshape(k, b, g, -1)
        # a multiply and a sum, not einsum: einsum runs as K*B matrix-vector products through bmm, and at these
        # sizes that took 0.78 ms of a 1.8 ms forward and backward against 0.2 ms (float32 rounding apart, equal)
        return (c * q.unsqueeze(2)).sum(dim=-1)

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
        """One ``torch.optim.Adam`` step of every member not ``frozen``, element for element the single-tensor
        update torch runs on the CPU (the same operations in the same order, per-member step size and bias
        correction, ``weight_decay``'s L2 term added to the gradient); frozen members (a skipped batch, a pruned or
        failed member) keep weights and state."""
        keep = [k for k in range(self.k) if frozen[k]]
        saved = [(t, t[keep].clone()) for t in (self.data, self.exp_avg, self.exp_avg_sq)] if keep else []
        beta1, beta2 = ADAM_BETAS
        for k in range(self.k):
            self.steps[k] += 0 if frozen[k] else 1
        steps = [max(s, 1) for s in self.steps]
        grad = self.grad
        if any(weight_decays):  # torch: grad = grad.add(param, alpha=weight_decay)
            grad = grad + self.data * torch.tensor(list(weight_decays), device=grad.device).view(-1, 1)
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        dev = self.data.device
        neg_step = torch.tensor([[-(lr / (1 - beta1**s))] for lr, s in zip(lrs, steps)], device=dev)
        bc2_sqrt = torch.tensor([[math.sqrt(1 - beta2**s)] for s in steps], device=dev)
        denom = (self.exp_avg_sq.sqrt() / bc2_sqrt).add_(ADAM_EPS)
        self.data.add_(neg_step * self.exp_avg / denom)
        for t, old in saved:
            t[keep] = old
