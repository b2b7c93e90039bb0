"""Held-out ranking metrics (the table in ``docs/pipeline.md``), vectorised over groups."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .data import GroupData
from .device import module_device
from .losses import _check_mask
from .model import compute_log_probs

# Metric names in the order tables show them; utility@1 only exists when the data knows the true utility.
# The one list of held-out metrics, in table order, with the direction that counts as better: +1 larger is better,
# -1 smaller is better, 0 descriptive only. Tables, the ablation's verdicts and the notebooks' panels all read it.
METRIC_DIRECTION: dict[str, int] = {
    "acc@1": 1, "mrr": 1, "ndcg@5": 1, "reward@1": 1, "regret@1": -1, "utility@1": 1, "kl_to_sft": 0, "entropy": 0,
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
    mask = _check_mask(mask, scores)
    s = torch.where(mask, scores, scores.new_tensor(float("-inf")))
    top1 = s.argmax(dim=1, keepdim=True)
    out: dict[str, Tensor] = {"acc@1": (top1.squeeze(1) == labels).to(scores.dtype)}

    label_score = s.gather(1, labels.long().unsqueeze(1))
    rank = 1 + ((s > label_score) & mask).sum(dim=1)
    out["mrr"] = 1.0 / rank.to(scores.dtype)

    big = torch.finfo(rewards.dtype).max
    gains = torch.where(mask, rewards - rewards.masked_fill(~mask, big).amin(dim=1, keepdim=True), 0.0)
    kk = min(k, scores.shape[1])
    discount = 1.0 / torch.log2(torch.arange(2, kk + 2, dtype=gains.dtype, device=gains.device))
    # Stable sort on -score keeps lower indices first among ties; masked entries sort last with gain 0.
    order = torch.sort(-s, dim=1, stable=True).indices[:, :kk]
    dcg = (gains.gather(1, order) * discount).sum(dim=1)
    idcg = (torch.sort(gains, dim=1, descending=True).values[:, :kk] * discount).sum(dim=1)
    out[f"ndcg@{k}"] = torch.where(idcg > 0, dcg / idcg.clamp_min(torch.finfo(gains.dtype).tiny), float("nan"))

    r1 = rewards.gather(1, top1).squeeze(1)
    out["reward@1"] = r1
    out["regret@1"] = rewards.masked_fill(~mask, -big).amax(dim=1) - r1
    if utility is not None:
        out["utility@1"] = utility.gather(1, top1).squeeze(1)
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
    (all rewards equal) are left out of its mean (1.0 if no group is left). Ties in ``scores`` go to the lower
    index, as in ``argmax``.
    """
    per_group = per_group_metrics(scores, labels, rewards, mask, k=k, utility=utility, logp=logp, ref_logp=ref_logp)
    out = {}
    for name in metric_order(per_group):  # a few host syncs per evaluation, none per training step
        values = per_group[name]
        scored = values[~torch.isnan(values)]
        out[name] = scored.mean().item() if scored.numel() else 1.0
    return out


def evaluate(
    model: nn.Module,
    data: GroupData,
    *,
    temperature: float = 1.0,
    reference: nn.Module | None = None,
    k: int = 5,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Score ``data`` with ``model`` and return :func:`ranking_metrics` (``kl_to_sft`` needs ``reference``).

    ``device``: where to compute (the model and the reference are moved there); ``None`` = where the model is.
    """
    if device is not None:
        model.to(device)
        if reference is not None:
            reference.to(device)
    device = module_device(model)
    if data.query_x.device != device:
        data = data.to(device)
    logp = compute_log_probs(model, data, temperature, precision=precision)
    ref_logp = None if reference is None else compute_log_probs(reference, data, temperature, precision=precision)
    # Ranking by log-prob equals ranking by similarity (monotone within a group).
    return ranking_metrics(logp, data.labels, data.rewards, data.mask, k=k, utility=data.utility,
                           logp=logp, ref_logp=ref_logp)
