"""K copies of the built-in :class:`~v3kit.model.TwoTower` trained as one: their parameters live side by side in
one flat buffer ``[K, P]`` (member ``k``'s row holds its parameters in ``named_parameters`` order), each layer runs
as one batched matmul (``baddbmm`` over stacked weights ``[K, out, in]``), and Adam and gradient-norm clipping are
a handful of operations on the whole buffer, each member with its own learning rate, clipping norm and step count
(:class:`~v3kit.train.stacked_flat.FlatStack`, which the ``torch.vmap`` stack of any other model shares).

Why: a run of the default world is bound by the fixed cost of each small operation, not by arithmetic; doing K
runs' work in each operation divides that cost by about K (``docs/performance.md``).

The members' own modules stay ordinary ``nn.Module`` objects: :meth:`StackedTowers.to_members` copies the stacked
weights into them before anything reads a member (evaluation, checkpoints, a refresh of GRPO's old policy), and
:meth:`StackedTowers.from_members` copies them back after a resume loaded a member's checkpoint.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .model import DEFAULT_METHODS, INTERFACE_ATTR, ResidualTower, TwoTower
from .stacked_flat import FlatStack


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


def _mlp_forward(
    plan: list[tuple[str, ...]], x: Tensor, params: dict[str, Tensor]
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The MLP's output, and the input of each linear layer and of each GELU (what its backward reads)."""
    inputs, pre = [], []
    for op in plan:
        if op[0] == "linear":
            inputs.append(x)
            x = torch.baddbmm(params[op[2]].unsqueeze(1), x, params[op[1]])
        else:
            pre.append(x)
            x = nn.functional.gelu(x, approximate=op[1])
    return x, inputs, pre


class _StackedMLP(torch.autograd.Function):
    """The built-in MLP of K members (weights ``[K, in, out]``, biases ``[K, out]``) as one autograd node: the
    forward's batched matmuls and GELUs, and backward the gradients autograd would compute for them, operation for
    operation (``bmm`` for a weight and for the layer's input, a sum over rows for a bias, ``gelu_backward``). A
    default-world step is bound by its number of operations and autograd nodes: this saves 8 nodes per tower
    (and their bookkeeping) per step."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: list[tuple[str, ...]], *weights: Tensor) -> Tensor:  # type: ignore[override]
        names = [name for op in plan if op[0] == "linear" for name in op[1:]]
        out, inputs, pre = _mlp_forward(plan, x, dict(zip(names, weights)))
        ctx.plan = plan
        ctx.input_grad = x.requires_grad
        ctx.save_for_backward(*inputs, *pre, *weights)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan = ctx.plan
        n_linear = sum(op[0] == "linear" for op in plan)
        saved = ctx.saved_tensors
        inputs, pre = list(saved[:n_linear]), list(saved[n_linear : len(saved) - 2 * n_linear])
        weights = saved[len(saved) - 2 * n_linear :]
        grads: list[Tensor | None] = [None] * len(weights)
        li, gi = n_linear, len(pre)
        for op in reversed(plan):
            if op[0] == "gelu":
                gi -= 1
                grad = torch.ops.aten.gelu_backward(grad, pre[gi], approximate=op[1])
                continue
            li -= 1
            w = weights[2 * li]
            grads[2 * li] = torch.bmm(inputs[li].transpose(1, 2), grad)
            grads[2 * li + 1] = grad.sum(dim=1)
            if li > 0 or ctx.input_grad:  # the first layer's input is data: no gradient
                grad = torch.bmm(grad, w.transpose(1, 2))
        return (grad if ctx.input_grad else None, None, *grads)


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


class StackedTowers(FlatStack):
    """The stacked forward pass of K built-in two-tower members (parameters, clipping and Adam: :class:`FlatStack`)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        reason = stack_reason(members)
        if reason is not None:
            raise ValueError(f"cannot stack these models: {reason}")
        template = members[0]
        named = list(template.named_parameters())
        # A linear weight [out, in] is stored transposed, [in, out]: baddbmm then reads it as it lies, and its
        # gradient comes out in that layout (about a fifth less backward time than a transposed view).
        transposed = {n for n, p in named if n.endswith(".weight") and p.dim() == 2}
        super().__init__(len(members), named, transposed)
        self.query_plan, self.residual = _tower_plan(template.query_tower, "query_tower")  # type: ignore[misc]
        self.cand_plan, _ = _tower_plan(template.cand_tower, "cand_tower")  # type: ignore[misc]
        self.normalize = template.normalize
        self.from_members(members)

    # ------------------------------------------------------------------ forward
    def _mlp(self, plan: list[tuple[str, ...]], x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # training: one autograd node for the whole MLP
            weights = [self.params[name] for op in plan if op[0] == "linear" for name in op[1:]]
            return _StackedMLP.apply(x, plan, *weights)
        return _mlp_forward(plan, x, self.params)[0]

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
