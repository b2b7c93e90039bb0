"""Held-out ranking metrics (DESIGN.md "Metrics every run reports"), vectorised over groups."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .data import GroupData
from .losses import _check_mask
from .model import compute_log_probs

# Metric names in the order tables show them; utility@1 only exists when the data knows the true utility.
METRIC_NAMES = ("acc@1", "mrr", "ndcg@5", "reward@1", "regret@1", "utility@1", "kl_to_sft", "entropy")


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
    """Label, reward and (optionally) utility and KL metrics of one scored set of groups.

    ``ndcg@k`` uses ``reward - min(group reward)`` as gain so gains are non-negative; groups whose ideal DCG is 0
    (all rewards equal) are left out of the mean. Ties in ``scores`` go to the lower index, as in ``argmax``.
    """
    mask = _check_mask(mask, scores)
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype)
    s = torch.where(mask, scores, neg_inf)
    top1 = s.argmax(dim=1, keepdim=True)
    out: dict[str, float] = {}
    out["acc@1"] = (top1.squeeze(1) == labels).float().mean().item()

    label_score = s.gather(1, labels.long().unsqueeze(1))
    rank = 1 + ((s > label_score) & mask).sum(dim=1)
    out["mrr"] = (1.0 / rank.to(scores.dtype)).mean().item()

    big = torch.finfo(rewards.dtype).max
    gains = torch.where(mask, rewards - rewards.masked_fill(~mask, big).amin(dim=1, keepdim=True), 0.0)
    kk = min(k, scores.shape[1])
    discount = 1.0 / torch.log2(torch.arange(2, kk + 2, dtype=gains.dtype))
    # Stable sort on -score keeps lower indices first among ties; masked entries sort last with gain 0.
    order = torch.sort(-s, dim=1, stable=True).indices[:, :kk]
    dcg = (gains.gather(1, order) * discount).sum(dim=1)
    ideal = torch.sort(gains, dim=1, descending=True).values[:, :kk]
    idcg = (ideal * discount).sum(dim=1)
    ok = idcg > 0
    out[f"ndcg@{k}"] = (dcg[ok] / idcg[ok]).mean().item() if ok.any() else 1.0

    r1 = rewards.gather(1, top1).squeeze(1)
    out["reward@1"] = r1.mean().item()
    out["regret@1"] = (rewards.masked_fill(~mask, -big).amax(dim=1) - r1).mean().item()
    if utility is not None:
        out["utility@1"] = utility.gather(1, top1).mean().item()
    if logp is not None:
        p_logp = torch.where(mask, logp.exp() * logp, 0.0)
        out["entropy"] = (-p_logp.sum(dim=1)).mean().item()
        if ref_logp is not None:
            kl = torch.where(mask, logp.exp() * (logp - ref_logp), 0.0)
            out["kl_to_sft"] = kl.sum(dim=1).mean().item()
    return out


def evaluate(
    model: nn.Module,
    data: GroupData,
    *,
    temperature: float = 1.0,
    reference: nn.Module | None = None,
    k: int = 5,
) -> dict[str, float]:
    """Score ``data`` with ``model`` and return :func:`ranking_metrics` (``kl_to_sft`` needs ``reference``)."""
    logp = compute_log_probs(model, data, temperature)
    ref_logp = None if reference is None else compute_log_probs(reference, data, temperature)
    # Ranking by log-prob equals ranking by similarity (monotone within a group).
    return ranking_metrics(logp, data.labels, data.rewards, data.mask, k=k, utility=data.utility,
                           logp=logp, ref_logp=ref_logp)
