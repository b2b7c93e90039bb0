"""The SFT, RCE and GRPO objectives of K stacked members at once (scores ``[K, B, G]``), each member with its own
numbers (temperatures, ``label_weight``, clip range, ``kl_beta``, ``entropy_coef``, old and reference log-probs).

They are the formulas of :mod:`v3kit.train.losses` and the stages' ``step`` methods, written over a leading member
dimension so that one operation serves K members: at the default world's size a step is bound by the number of
small operations, and GRPO's objective holds as many as the towers themselves. Every quantity equals the sequential
one within float32 rounding (``tests/test_stacked.py`` checks each against the member's own sequential run).

:func:`objective_key` says which members one stacked objective can serve: None for a member whose switches it does
not cover (GRPO's ``samples: sampled``, the exact KL, the adaptive KL, ``drop_zero_std_groups``, batch-scaled
advantages), else what the members of one objective must share (the stage, and the switches that change its code:
GRPO's sampling, KL estimator and reference, loss type, dual clip; RCE's reward normalisation). The stacked trainer
runs one objective per key over those members' rows of the scores, and each uncovered member's own ``Stage.step`` on
its slice, which covers everything; :func:`stacked_loss` (all members under one key) returns None otherwise.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .grpo import GRPOStage, per_group_advantages
from .losses import LOG_RATIO_CLAMP, kl_penalty, normalize_rewards, score_log_probs
from .rce import RCEStage, annealed_temperature
from .sft import SFTStage
from .training import Stage, StepContext

Stats = list[dict[str, Any]]


# The stacked trainer's cache of what stays the same from step to step: the per-member numbers as tensors, and
# the members' per-group tensors (old and reference log-probs, advantages) stacked for one gather per step. An
# entry keeps the tensors it was made from, so their ids cannot be reused while it lives.
StackCache = dict[Any, Any]


def _col(values: Sequence[float], like: Tensor, cache: StackCache | None = None) -> Tensor:
    """Per-member python numbers as a ``[K, 1, 1]`` tensor (rounded to float32 once, as torch rounds a python
    scalar operand)."""
    key = ("col", tuple(values), like.dtype, like.device)
    hit = None if cache is None else cache.get(key)
    if hit is None:
        hit = torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, 1, 1)
        if cache is not None:
            cache[key] = hit
    return hit


def _rows(cache: StackCache | None, name: str, tensors: Sequence[Tensor], idx: Tensor) -> Tensor:
    """Rows ``idx [K, B]`` of each member's own tensor (``tensors[k]``: ``[N, ...]``) as ``[K, B, ...]``: one
    gather from the members' tensors stacked once (or from the one tensor they share), not K gathers a step."""
    key = tuple(id(t) for t in tensors)
    hit = None if cache is None else cache.get(name)
    if hit is None or hit[0] != key:
        shared = all(t is tensors[0] for t in tensors)
        hit = (key, None if shared else torch.stack(list(tensors)), list(tensors))
        if cache is not None:
            cache[name] = hit
    if hit[1] is None:
        return tensors[0][idx]
    members = torch.arange(len(tensors), device=idx.device).unsqueeze(1)
    return hit[1][members, idx]


def member_log_probs(
    scores: Tensor, temperatures: Sequence[float], mask: Tensor | None, cache: StackCache | None = None
) -> Tensor:
    """:func:`v3kit.train.losses.score_log_probs` per member (scores ``[K, B, G]``, one temperature each)."""
    return score_log_probs(scores, _col(temperatures, scores, cache), mask)


# ``mask=None`` below: no group of the stage's data has padding (``b["full"]``: every real-text table so far). Every
# ``torch.where(mask, x, 0)`` is then ``x`` itself, so the same values come out of fewer operations (a GRPO step's
# masks were about 40 of its 200, and a small step is bound by its number of operations).
def _valid(mask: Tensor | None, x: Tensor, other: Tensor | float = 0.0) -> Tensor:
    """``x`` at the valid entries, ``other`` at the padding."""
    return x if mask is None else torch.where(mask, x, other)


def _count(mask: Tensor | None, like: Tensor) -> Tensor:
    """Valid entries per member ``[K]`` (int64, as ``mask.sum``); ``like``: ``[..., K, B, G]``."""
    if mask is not None:
        return mask.sum(dim=(1, 2))
    k, b, g = like.shape[-3:]
    return torch.full((k,), b * g, dtype=torch.int64, device=like.device)


# The means below reduce the last two dims (a member's batch and group), so ``x`` may also be several statistics
# stacked in front of the member dim, ``[S, K, B, G]``, each reduced in the same one operation.
def _masked_mean(x: Tensor, mask: Tensor | None, w: Tensor | None, total: Tensor) -> Tensor:
    x = _valid(mask, x)
    return (x if w is None else x * w).sum(dim=(-2, -1)) / total  # (x * 1 is x: a weight of ones is left out)


def _mean_over(x: Tensor, mask: Tensor | None) -> Tensor:
    return _valid(mask, x).sum(dim=(-2, -1)) / _count(mask, x)


def _std_over(x: Tensor, mask: Tensor | None) -> Tensor:
    n = _count(mask, x)
    mean = _mean_over(x, mask).view(-1, 1, 1)
    var = _valid(mask, (x - mean) ** 2).sum(dim=(1, 2)) / (n - 1).clamp_min(1)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def _entropy(logp: Tensor, mask: Tensor | None) -> Tensor:
    lp = _valid(mask, logp)
    return -_valid(mask, lp.exp() * lp).sum(dim=-1).mean(dim=-1)


class Ref:
    """Member ``j``'s entry of a per-member statistic ``values [K]``: read back with the others at the next flush
    (one transfer per statistic and step, not one per member; no view per member)."""

    __slots__ = ("values", "j")

    def __init__(self, values: Tensor, j: int) -> None:
        self.values, self.j = values, j


def _split(stats: dict[str, Tensor | float], k: int) -> Stats:
    return [{name: (Ref(v, j) if isinstance(v, Tensor) else v) for name, v in stats.items()} for j in range(k)]


def _mask(b: dict[str, Any]) -> Tensor | None:
    """The batch's padding mask, or None when the stage's data has no padding (see :func:`_valid`)."""
    return None if b.get("full") else b["mask"]


def _sft(stages: Sequence[Stage], b: dict[str, Tensor], scores: Tensor, cache: StackCache) -> tuple[Tensor, Stats]:
    logp = member_log_probs(scores, [s.temperature for s in stages], _mask(b), cache)
    loss = -logp.gather(2, b["labels"].unsqueeze(2)).squeeze(2).mean(dim=1)
    return loss, [{} for _ in stages]


def _rce(
    stages: Sequence[RCEStage], b: dict[str, Tensor], scores: Tensor, ctxs: Sequence[StepContext], cache: StackCache
) -> tuple[Tensor, Stats]:
    cfgs = [s.cfg for s in stages]
    reward_ts, logit_ts = [], []
    for s, ctx in zip(stages, ctxs):  # each member's own schedule, as RCEStage.step
        s.annealed = annealed_temperature(ctx.step, ctx.total_steps, s.cfg.t_start, s.cfg.t_end)
        reward_t, logit_t = s.cfg.temperatures(s.annealed, s.temperature)
        reward_ts.append(reward_t)
        logit_ts.append(logit_t)
    logp = member_log_probs(scores, logit_ts, _mask(b))
    valid = torch.isfinite(logp)
    k, n, g = logp.shape
    rewards = b["rewards"]
    if cfgs[0].reward_norm != "none":
        rewards = normalize_rewards(rewards.reshape(k * n, g), valid.reshape(k * n, g), cfgs[0].reward_norm)
        rewards = rewards.reshape(k, n, g)
    scaled = (rewards / _col(reward_ts, logp)).masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scaled, dim=-1)
    onehot = torch.nn.functional.one_hot(b["labels"].long(), g).to(weights.dtype)
    lw = [c.label_weight for c in cfgs]
    targets = _col(lw, logp, cache) * onehot + _col([1.0 - w for w in lw], logp, cache) * weights
    per_entry = torch.where(valid, targets * logp, torch.zeros_like(logp))
    loss = -per_entry.sum(dim=2).mean(dim=1)
    return loss, [{"temperature": s.annealed} for s in stages]


def objective_key(stage: Stage) -> tuple[Any, ...] | None:
    """What members must share to train under one stacked objective (see the module docstring); None: this
    member's switches need its own ``Stage.step``."""
    if type(stage) is SFTStage:
        return (SFTStage,)
    if type(stage) is RCEStage:
        return (RCEStage, stage.cfg.reward_norm)
    if type(stage) is GRPOStage:
        c = stage.cfg
        if c.samples == "sampled" or c.kl_estimator == "exact" or c.kl_target is not None or c.drop_zero_std_groups:
            return None
        if not per_group_advantages(c) or stage.terms is None:
            return None
        return (
            GRPOStage,
            c.samples,
            c.kl_estimator,
            c.kl_reference,
            c.loss_type,
            c.dual_clip is None,
            stage.ref is None,
        )
    return None


def _grpo(stages: Sequence[GRPOStage], b: dict[str, Tensor], scores: Tensor, cache: StackCache) -> tuple[Tensor, Stats]:
    cfgs = [s.cfg for s in stages]
    c0, idx, mask = cfgs[0], b["index"], _mask(b)
    logp = member_log_probs(scores, [s.temperature for s in stages], mask, cache)
    old = _rows(cache, "old", [s.old for s in stages], idx)
    ref = None if stages[0].ref is None else _rows(cache, "ref", [s.ref for s in stages], idx)  # type: ignore[misc]
    zero = _rows(cache, "zero", [s.terms[0] for s in stages], idx)  # type: ignore[index]
    adv_all = _rows(cache, "adv", [s.terms[1] for s in stages], idx)  # type: ignore[index]
    weights = _valid(mask, old.exp()) if c0.samples == "exact" else None
    ratio = torch.exp(_valid(mask, logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = _valid(mask, adv_all)
    lo = _col([1.0 - c.eps_low for c in cfgs], logp, cache)
    hi = _col([1.0 + (c.eps_low if c.eps_high is None else c.eps_high) for c in cfgs], logp, cache)
    if c0.loss_type == "cispo":
        surrogate = torch.clamp(ratio, lo, hi).detach() * adv * _valid(mask, logp)
    else:
        surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
        if c0.dual_clip is not None:
            dual = _col([c.dual_clip for c in cfgs], logp, cache) * adv
            surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual), surrogate)
    pg = -surrogate
    estimator = c0.kl_estimator or ("seed" if ref is None else "k3")
    anchor = old if ref is None else ref
    # the entries' weights (None: all 1, every entry valid and equally weighted) and their total per member
    if weights is not None:
        w = weights.to(pg.dtype)
    else:
        w = None if mask is None else mask.to(pg.dtype)
    total = _count(mask, pg).to(pg.dtype) if w is None else w.sum(dim=(1, 2))
    total = total.clamp_min(torch.finfo(pg.dtype).tiny)
    kl = kl_penalty(_valid(mask, logp), _valid(mask, anchor), estimator)
    loss = _masked_mean(pg + _col([c.kl_beta for c in cfgs], logp, cache) * kl, mask, w, total)
    coefs = [c.entropy_coef for c in cfgs]
    if any(coefs):
        loss = loss - torch.tensor(coefs, dtype=loss.dtype, device=loss.device) * _entropy(logp, mask)
    with torch.no_grad():
        low = (ratio < lo) & (adv < 0)
        high = (ratio > hi) & (adv > 0)
        inf = float("inf")
        # the weighted means, then the plain means, each group as one reduction over a stack (a step of the
        # default world is bound by its number of operations; these were 30 of them)
        weighted = _masked_mean(torch.stack([pg, kl]), mask, w, total)
        plain = torch.stack([(low | high).float(), low.float(), high.float(), ratio.float()])
        plain = _mean_over(plain, mask)
        stats: dict[str, Tensor | float] = {
            "pg_loss": weighted[0],
            "kl": weighted[1],
            "clip_ratio": plain[0],
            "clip_ratio/low_mean": plain[1],
            "clip_ratio/high_mean": plain[2],
            "ratio_mean": plain[3],
            "ratio_min": _valid(mask, ratio, inf).amin(dim=(1, 2)),
            "ratio_max": _valid(mask, ratio, -inf).amax(dim=(1, 2)),
            "entropy": _entropy(logp, mask),
            "frac_reward_zero_std": zero.float().mean(dim=1),
            "adv_std": _std_over(adv_all, mask),
        }
    out = _split(stats, len(stages))
    for row, s in zip(out, stages):
        row["temperature"] = s.temperature
    return loss, out


def stacked_loss(
    stages: Sequence[Stage],
    b: dict[str, Any],
    scores: Tensor,
    ctxs: Sequence[StepContext],
    cache: StackCache | None = None,
) -> tuple[Tensor, Stats] | None:
    """Every member's loss ``[K]`` and statistics (one dict per member: python floats and :class:`Ref`), or None
    where the members' switches need their own ``Stage.step`` (see the module docstring). ``b``: the members'
    batches stacked (``index``: ``[K, B]`` rows of each member's data; ``mask``, ``labels``, ``rewards``:
    ``[K, B, ...]``). ``cache``: a dict the caller keeps from step to step (:data:`StackCache`)."""
    cache = {} if cache is None else cache
    keys = {objective_key(s) for s in stages}
    if len(keys) != 1 or None in keys:
        return None
    kind = type(stages[0])
    if kind is SFTStage:
        return _sft(stages, b, scores, cache)
    if kind is RCEStage:
        return _rce(stages, b, scores, ctxs, cache)  # type: ignore[arg-type]
    return _grpo(stages, b, scores, cache)  # type: ignore[arg-type]
