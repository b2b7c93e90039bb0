"""Held-out ranking metrics (the table in ``docs/pipeline.md``), vectorised over groups."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..data.contract import GroupData
from .device import module_device
from .masked import check_mask
from .model import compute_log_probs

# Metric names in the order tables show them; utility@1 only exists when the data knows the true utility.
# The one list of held-out metrics, in table order, with the direction that counts as better: +1 larger is better,
# -1 smaller is better, 0 descriptive only. Tables, the ablation's verdicts and the notebooks' panels all read it.
METRIC_DIRECTION: dict[str, int] = {
    "acc@1": 1,
    "mrr": 1,
    "ndcg@5": 1,
    "reward@1": 1,
    "regret@1": -1,
    "utility@1": 1,
    "kl_to_sft": 0,
    "entropy": 0,
}
METRIC_NAMES = tuple(METRIC_DIRECTION)


def metric_order(names: Iterable[str]) -> list[str]:
    """``names`` in :data:`METRIC_NAMES` order (``ndcg@k`` at ndcg@5's place, unknown names last), so every table
    (``run``, ``eval``, notebooks) shows the same column order."""

    def rank(name: str) -> int:
        key = "ndcg@5" if name.startswith("ndcg@") else name
        return METRIC_NAMES.index(key) if key in METRIC_NAMES else len(METRIC_NAMES)

    return sorted(names, key=rank)  # stable: unknown names keep their order


def per_group_metrics(
    scores: Tensor,
    labels: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    k: int = 5,
    utility: Tensor | None = None,
    logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every metric of :func:`ranking_metrics` per group ([B] tensors): the unit a paired bootstrap resamples.

    ``ndcg@k`` is NaN for a group whose ideal DCG is 0 (all rewards equal: every ranking is ideal, nothing to
    score); such groups depend only on the rewards, so they are NaN for every model alike.
    """
    mask = check_mask(mask, scores)
    neg_inf = scores.new_tensor(float("-inf"))
    # NaN compares false with everything, so left as is it would never rank above the label (a NaN model would
    # score mrr = 1). It is ranked as -inf: the worst score, tied only with other NaN/-inf candidates.
    s = torch.where(mask & ~torch.isnan(scores), scores, neg_inf)

    # Tie-aware ranks: tied candidates are ordered uniformly at random and every top-1/rank metric is its
    # expectation over that order, so a model that scores all candidates equally is exactly a random ranker.
    label_score = s.gather(1, labels.long().unsqueeze(1))
    greater = ((s > label_score) & mask).sum(dim=1, keepdim=True)
    ties = (((s == label_score) & mask).sum(dim=1, keepdim=True) - 1).clamp_min(0)  # excluding the label
    # The label's position is 1 + greater + k, k uniform in 0..ties: average 1/position over that block.
    pos = torch.arange(1, scores.shape[1] + 1, dtype=scores.dtype, device=scores.device).unsqueeze(0)
    in_block = (pos > greater) & (pos <= greater + ties + 1)
    block = (ties + 1).squeeze(1).to(scores.dtype)
    out: dict[str, Tensor] = {"acc@1": (greater.squeeze(1) == 0).to(scores.dtype) / block}
    out["mrr"] = torch.where(in_block, 1.0 / pos, 0.0).sum(dim=1) / block
    # The top-1 pick is uniform over the candidates tied at the best score: its reward/utility are their mean.
    top = (s == s.amax(dim=1, keepdim=True)) & mask
    n_top = top.sum(dim=1).to(scores.dtype)

    def at_top1(values: Tensor) -> Tensor:
        return torch.where(top, values, 0.0).sum(dim=1) / n_top

    big = torch.finfo(rewards.dtype).max
    gains = torch.where(mask, rewards - rewards.masked_fill(~mask, big).amin(dim=1, keepdim=True), 0.0)
    kk = min(k, scores.shape[1])
    discount = 1.0 / torch.log2(torch.arange(2, kk + 2, dtype=gains.dtype, device=gains.device))
    # Stable sort on -score keeps lower indices first among ties. Masked entries must sort after every real one,
    # also after real -inf/NaN scores they tie with: first put real candidates first, then sort stably by score.
    real_first = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    order = real_first.gather(1, torch.sort((-s).gather(1, real_first), dim=1, stable=True).indices)[:, :kk]
    dcg = (gains.gather(1, order) * discount).sum(dim=1)
    idcg = (torch.sort(gains, dim=1, descending=True).values[:, :kk] * discount).sum(dim=1)
    # The ideal DCG may be subnormal (rewards ~1e-310 apart) but still > 0: divide by it as it is; only the
    # groups without an ideal DCG (NaN) get a placeholder denominator.
    out[f"ndcg@{k}"] = torch.where(idcg > 0, dcg / torch.where(idcg > 0, idcg, torch.ones_like(idcg)), float("nan"))

    r1 = at_top1(rewards)
    out["reward@1"] = r1
    out["regret@1"] = rewards.masked_fill(~mask, -big).amax(dim=1) - r1
    if utility is not None:
        out["utility@1"] = at_top1(utility)
    if logp is not None:
        out["entropy"] = -torch.where(mask, logp.exp() * logp, 0.0).sum(dim=1)
        if ref_logp is not None:
            out["kl_to_sft"] = torch.where(mask, logp.exp() * (logp - ref_logp), 0.0).sum(dim=1)
    return out


def ranking_metrics(
    scores: Tensor,
    labels: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    k: int = 5,
    utility: Tensor | None = None,
    logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> dict[str, float]:
    """Label, reward and (optionally) utility and KL metrics of one scored set of groups, averaged over groups.

    ``ndcg@k`` uses ``reward - min(group reward)`` as gain so gains are non-negative; groups whose ideal DCG is 0
    (all rewards equal) are left out of its mean (1.0 if no group is left).

    Ties in ``scores`` are broken uniformly at random, in expectation: with ``g`` candidates scored above the label
    and ``t`` others tied with it, ``acc@1 = [g == 0] / (t + 1)`` and ``mrr = mean_{k=0..t} 1 / (1 + g + k)``
    (the expected reciprocal rank); ``reward@1``/``utility@1``/``regret@1`` average over the candidates tied at the
    top. All-equal scores over ``G`` candidates thus give ``acc@1 = 1/G`` and ``mrr = H_G / G``, as a random
    ranker. NaN scores rank as -inf. ``ndcg@k`` breaks ties by the lower index (a stable sort).
    """
    per_group = per_group_metrics(scores, labels, rewards, mask, k=k, utility=utility, logp=logp, ref_logp=ref_logp)
    out = {}
    for name in metric_order(per_group):  # a few host syncs per evaluation, none per training step
        values = per_group[name]
        scored = values[~torch.isnan(values)]
        out[name] = scored.mean().item() if scored.numel() else 1.0
    return out


def member_ranking_metrics(
    logp: Tensor,
    labels: Tensor,
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    k: int = 5,
    utility: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> list[dict[str, float]]:
    """:func:`ranking_metrics` of K members' log-probs ``logp [K, N, G]`` of the same groups (``ref_logp``:
    ``[K, N, G]`` or None), one dict per member: one pass of :func:`per_group_metrics` over all K*N groups and one
    host read, where K calls make about 40 small operations and 10 reads each. The per-group values are the same;
    the means are summed in another order (float rounding apart, equal)."""
    n_members, n, g = logp.shape

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.unsqueeze(0).expand(n_members, *t.shape).reshape(n_members * n, *t.shape[1:])

    flat = logp.reshape(n_members * n, g)
    ref = None if ref_logp is None else ref_logp.reshape(n_members * n, g)
    mask = check_mask(mask, logp[0])
    per_group = per_group_metrics(
        flat, rep(labels), rep(rewards), rep(mask), k=k, utility=rep(utility), logp=flat, ref_logp=ref
    )
    names = metric_order(per_group)
    values = torch.stack([per_group[name].reshape(n_members, n) for name in names])  # [metrics, K, N]
    scored = ~torch.isnan(values)
    counts = scored.sum(dim=-1)
    means = torch.where(scored, values, 0.0).sum(dim=-1) / counts.clamp_min(1)
    table = torch.where(counts > 0, means, 1.0).tolist()  # 1.0 where no group is scored, as ranking_metrics
    return [{name: table[i][j] for i, name in enumerate(names)} for j in range(n_members)]


def evaluate(
    model: nn.Module,
    data: GroupData,
    *,
    temperature: float = 1.0,
    reference: nn.Module | None = None,
    k: int = 5,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    ref_logp: Tensor | None = None,
) -> dict[str, float]:
    """Score ``data`` with ``model`` and return :func:`ranking_metrics` (``kl_to_sft`` needs ``reference``).

    ``device``: where to compute (the model and the reference are moved there); ``None`` = where the model is.
    ``ref_logp``: the frozen reference's log-probs of ``data`` at ``temperature`` when the caller has them already
    (a reference that never changes need not be re-scored for every evaluation).
    """
    if device is not None:
        model.to(device)
        if reference is not None:
            reference.to(device)
    device = module_device(model)
    if data.query_x.device != device:
        data = data.to(device)
    logp = compute_log_probs(model, data, temperature, precision=precision)
    if ref_logp is None and reference is not None:
        ref_logp = logp if reference is model else compute_log_probs(reference, data, temperature, precision=precision)
    # Ranking by log-prob equals ranking by similarity (monotone within a group).
    return ranking_metrics(
        logp, data.labels, data.rewards, data.mask, k=k, utility=data.utility, logp=logp, ref_logp=ref_logp
    )
