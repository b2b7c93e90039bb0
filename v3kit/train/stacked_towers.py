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

from typing import Sequence

import torch
from torch import Tensor, nn

from ..data.contract import gather_rows
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
        if type(layer) is nn.Linear:  # without a bias too (model.residual_kind: linear)
            bias = f"{inner}.{i}.bias" if layer.bias is not None else ""
            plan.append(("linear", f"{inner}.{i}.weight", bias))
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
        for op in plan:
            if op[0] == "linear":
                w = self.params[op[1]]
                x = torch.baddbmm(self.params[op[2]].unsqueeze(1), x, w) if op[2] else torch.bmm(x, w)
            else:
                x = nn.functional.gelu(x, approximate=op[1])
        return x

    def _tower(self, plan: list[tuple[str, ...]], x: Tensor) -> Tensor:
        if self.residual:
            return nn.functional.normalize(x + self._mlp(plan, x), dim=-1)
        out = self._mlp(plan, x)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out

    def scores(self, query_x: Tensor, cand_x: Tensor, table: Tensor | None = None) -> Tensor:
        """Every member's scores ``[K, B, G]`` of its own batch (``query_x [K, B, Dq]``, ``cand_x [K, B, G, Dc]``).
        With ``table`` (``[U, Dc]``, the distinct candidates: :mod:`v3kit.data.shared_candidates`), ``cand_x`` is
        each slot's row of it, ``[K, B, G]``: every member embeds the table once and its slots gather their rows."""
        q = self._tower(self.query_plan, query_x)
        if table is None:
            k, b, g, dc = cand_x.shape
            c = self._tower(self.cand_plan, cand_x.reshape(k, b * g, dc)).reshape(k, b, g, -1)
        else:
            k = cand_x.shape[0]
            u = table.shape[0]
            emb = self._tower(self.cand_plan, table.expand(k, *table.shape))  # [K, U, E]
            offsets = torch.arange(0, k * u, u, device=cand_x.device).view(k, 1, 1)  # member k's rows of emb
            c = gather_rows(emb.reshape(k * u, -1), cand_x + offsets)  # [K, B, G, E]
        # a multiply and a sum, not einsum: einsum runs as K*B matrix-vector products through bmm, and at these
        # sizes that took 0.78 ms of a 1.8 ms forward and backward against 0.2 ms (float32 rounding apart, equal)
        return (c * q.unsqueeze(2)).sum(dim=-1)
