"""K members of any model trained as one with ``torch.func``: the stacked path for a user's module
(``model.target``), the scorer interface (cross-encoders) and imported models, beside the batched matmuls of
:class:`~v3kit.train.stacked_towers.StackedTowers` that the built-in towers keep.

The trainable parameters of the K members are views of one flat buffer ``[K, P]`` (:class:`FlatStack`, which also
holds the clipping and Adam); frozen parameters and buffers are stacked beside it, read-only. A forward pass runs
member 0's module code on each member's slice of that state: ``torch.func.functional_call`` of the model's scoring
interface (:func:`v3kit.train.model.scores`: the two towers then their dot product, or the scorer's own output,
as the sequential code scores) under ``torch.vmap`` over the member dimension. Autograd then writes every member's
gradient into the flat buffer at once.

What one vmapped forward pass cannot stand in for, and so runs one member after another (:func:`choose_stack` says
why in one line; nothing fails for it):

* a forward that draws random numbers in training (dropout kept on in SFT): one stack cannot reproduce the draws
  each run makes from its own seed, so its runs would not be the sequential runs (RCE and GRPO turn dropout off,
  ``model.disable_dropout``);
* a forward that updates a buffer in place (BatchNorm's running statistics in training), has data-dependent
  Python control flow, or raises under ``vmap`` for any other reason;
* members that differ in class, interface, parameter or buffer shapes, or that share a parameter (one tensor in
  two runs' models: stacking would copy it apart); a parameter that gets no gradient (torch's Adam leaves it
  alone, the stacked one would not); a model that builds its own inputs (``featurize``: the stack gathers feature
  tensors).

The forward-pass checks are a probe on a tiny batch before training: the stacked scores and gradients must exist,
leave the buffers unchanged and equal each member's own module's scores in training and in eval mode.
Parameters tied inside one model (a weight shared by both towers) stay tied: ``functional_call`` ties them.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .model import interface_of, scores
from .stacked_flat import AdamSnapshot, FlatStack
from .stacked_towers import StackedTowers, stack_reason

PROBE_GROUPS = 2  # groups of the first training rows in the probe batch
PROBE_RTOL, PROBE_ATOL = 1e-4, 1e-5  # float32: vmap's batched kernels may add in another order


class _Scoring(nn.Module):
    """The model's scores as a ``forward``, so ``functional_call`` can run either interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, query_x: Tensor, cand_x: Tensor) -> Tensor:
        return scores(self.model, query_x, cand_x)


def _layout(model: nn.Module) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype, bool]], list[tuple]]:
    params = [(n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    return params, [(n, tuple(b.shape), b.dtype) for n, b in model.named_buffers()]


def func_stack_reason(models: Sequence[nn.Module]) -> str | None:
    """Why ``models`` cannot be stacked by :class:`StackedFunc` at all (None: the probe decides); see the module
    docstring."""
    first = models[0]
    if getattr(first, "featurize", None) is not None:
        return "the model builds its own inputs (featurize), and the stack gathers feature tensors"
    layout, spec, seen = _layout(first), interface_of(first), set()
    for m in models:
        if type(m) is not type(first) or interface_of(m) != spec:
            return "the members' models differ in class or interface"
        if _layout(m) != layout:
            return "the members' models differ in parameter or buffer names, shapes, dtypes or which ones train"
        own = {id(t) for t in (*m.parameters(), *m.buffers())}
        if own & seen:
            return "the members share a parameter or buffer (one tensor in two runs' models), which stacking would copy apart"
        seen |= own
    trainable = [p for p in first.parameters() if p.requires_grad]
    if not trainable:
        return "the model has no trainable parameter"
    if len({p.dtype for p in trainable}) > 1 or not trainable[0].is_floating_point():
        return "the model's trainable parameters are not all of one floating dtype"
    return None


class StackedFunc(FlatStack):
    """The stacked forward pass of K members of any module, by ``torch.func`` (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        reason = func_stack_reason(members)
        if reason is not None:
            raise ValueError(f"cannot stack these models: {reason}")
        template = members[0]
        named = list(template.named_parameters())
        super().__init__(len(members), [(n, p) for n, p in named if p.requires_grad])
        self.order = [n for n, _ in named]  # every parameter, as torch.optim.Adam(model.parameters()) lists them
        fixed = [(n, p) for n, p in named if not p.requires_grad] + list(template.named_buffers())
        self.fixed = {n: torch.empty(self.k, *t.shape, dtype=t.dtype, device=t.device) for n, t in fixed}
        # member 0's code and structure; its state comes from the stack at every call. A copy on the members' device,
        # not on the meta device: some modules read their device outside the forward (Hugging Face's train()).
        self.scorer = _Scoring(copy.deepcopy(template))
        self.training: bool | None = None
        self.state = {f"model.{n}": t for n, t in (*self.params.items(), *self.fixed.items())}
        self.from_members(members)

    @torch.no_grad()
    def from_members(self, members: Sequence[nn.Module], which: Sequence[int] | None = None) -> None:
        """Copy the members' weights, frozen parameters and buffers into the stack (all, or the indices ``which``)."""
        super().from_members(members, which)
        for k in range(self.k) if which is None else which:
            own = {**dict(members[k].named_parameters()), **dict(members[k].named_buffers())}
            for name, stacked in self.fixed.items():
                stacked[k].copy_(own[name])

    def adam_state(self, k: int, snapshot: AdamSnapshot | None = None) -> list[dict[str, Tensor]]:
        """Member ``k``'s Adam state for every parameter of its model (a frozen one: step 0, no state), as
        ``torch.optim.Adam(model.parameters())`` lists them."""
        own = dict(zip(self.names, super().adam_state(k, snapshot)))
        return [own.get(n, {"step": torch.tensor(0.0)}) for n in self.order]

    def _one(self, state: dict[str, Tensor], query_x: Tensor, cand_x: Tensor) -> Tensor:
        return functional_call(self.scorer, state, (query_x, cand_x))

    def _mode(self, training: bool) -> None:
        if training != self.training:  # only on a change: a module's train() may be costly (Hugging Face's)
            self.scorer.train(training)
            self.training = training

    def scores(self, query_x: Tensor, cand_x: Tensor) -> Tensor:
        """Every member's scores ``[K, B, G]`` of its own batch (``query_x [K, B, Dq]``, ``cand_x [K, B, G, Dc]``).
        In training mode while autograd records (the training steps), in eval mode otherwise (the held-out
        evaluations), as the sequential code runs the model."""
        self._mode(torch.is_grad_enabled())
        return torch.vmap(self._one, randomness="error")(self.state, query_x, cand_x)


def _first_sentence(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else ""


def _why(error: Exception) -> str:
    text = _first_sentence(error)
    if "random operation" in text:
        return "its forward draws random numbers in training (dropout), which one stack cannot draw as each run does"
    if "data-dependent control flow" in text:
        return "its forward has data-dependent Python control flow"
    return f"its forward fails under torch.vmap ({type(error).__name__}: {text})"


def _own_scores(model: nn.Module, query_x: Tensor, cand_x: Tensor, training: bool) -> Tensor:
    """``model``'s own scores in training or eval mode (no autograd), leaving its mode and buffers as they were."""
    was, saved = model.training, {n: b.clone() for n, b in model.named_buffers()}
    try:
        model.train(training)
        with torch.no_grad():
            return scores(model, query_x, cand_x)
    finally:
        model.train(was)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def probe_reason(stack: StackedFunc, members: Sequence[nn.Module], query_x: Tensor, cand_x: Tensor) -> str | None:
    """Why ``stack`` cannot stand in for its ``members``' own forward passes, from one tiny batch (``query_x
    [B, Dq]``, ``cand_x [B, G, Dc]``, given to every member); None: it can. Leaves the stack and the members as it
    found them."""
    k = stack.k
    q, c = query_x.expand(k, *query_x.shape), cand_x.expand(k, *cand_x.shape)
    before = {n: t.clone() for n, t in stack.fixed.items()}
    try:
        with torch.enable_grad():
            trained = stack.scores(q, c)
            grads = torch.autograd.grad(trained.sum(), list(stack.params.values()), allow_unused=True)
        with torch.no_grad():
            evaluated = stack.scores(q, c)
            changed = [n for n, t in before.items() if not torch.equal(t, stack.fixed[n])]
    except Exception as e:  # whatever the module raises: it runs sequentially instead
        return _why(e)
    finally:
        with torch.no_grad():
            for n, t in before.items():
                stack.fixed[n].copy_(t)
    if changed:
        return f"its forward updates the buffer {changed[0]} in place in training (e.g. BatchNorm's running statistics)"
    unused = [n for n, g in zip(stack.names, grads) if g is None]
    if unused:
        return f"its parameter {unused[0]} gets no gradient (torch's Adam leaves it alone, the stacked Adam would not)"
    for j, m in enumerate(members):  # against each member's own module: what its sequential run computes
        a, b = _own_scores(m, query_x, cand_x, True), _own_scores(m, query_x, cand_x, False)
        ok = trained[j].shape == a.shape and torch.allclose(trained[j].detach(), a, PROBE_RTOL, PROBE_ATOL)
        if not ok or not torch.allclose(evaluated[j], b, PROBE_RTOL, PROBE_ATOL):
            return "its scores under torch.vmap differ from its own (an attribute that differs between the runs?)"
    return None


def choose_stack(models: Sequence[nn.Module], query_x: Tensor, cand_x: Tensor) -> tuple[FlatStack | None, str | None]:
    """The stack for ``models`` and None, or None and why they must run one after another: the built-in towers as
    :class:`StackedTowers`, any other model as :class:`StackedFunc` when :func:`probe_reason` passes on the tiny
    batch ``query_x [B, Dq]``, ``cand_x [B, G, Dc]`` (feature tensors on the models' device)."""
    if stack_reason(models) is None:
        return StackedTowers(models), None
    name = type(models[0]).__name__
    reason = func_stack_reason(models)
    if reason is None:
        try:
            stack = StackedFunc(models)
        except Exception as e:  # a module that cannot be copied
            reason = f"it cannot be stacked ({type(e).__name__}: {_first_sentence(e)})"
        else:
            reason = probe_reason(stack, models, query_x[:PROBE_GROUPS], cand_x[:PROBE_GROUPS])
            if reason is None:
                return stack, None
    return None, f"torch.vmap cannot stack the {name}: {reason}"
