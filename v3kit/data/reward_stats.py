"""Statistics of the rewards of a dataset: label/reward agreement, per-group spread, stage 1's summary."""

from __future__ import annotations

import torch

from .contract import GroupData


def label_reward_rank(data: GroupData) -> torch.Tensor:
    """Rank (1 = highest) of the human label's reward within its group, per group; ties count in its favour."""
    r = data.rewards.masked_fill(~data.mask, float("-inf"))
    label_r = r.gather(1, data.labels.unsqueeze(1))
    return 1 + (r > label_r).sum(dim=1)


def label_reward_agreement(data: GroupData) -> float:
    """Fraction of groups whose human label is (one of) the highest-reward candidate(s)."""
    return float((label_reward_rank(data) == 1).float().mean())


def reward_spread(data: GroupData) -> torch.Tensor:
    """Per-group standard deviation of the valid rewards (what GRPO's group normalisation divides by)."""
    return _spread(data.rewards, data.mask.float())


def _spread(rewards: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    n = m.sum(1)
    mean = (rewards * m).sum(1) / n
    var = (((rewards - mean.unsqueeze(1)) ** 2) * m).sum(1) / (n - 1).clamp_min(1)
    std = var.sqrt()
    overflow = ~torch.isfinite(std)  # rewards above ~1.8e19: their squares overflow float32; float64 holds them
    if overflow.any() and rewards.dtype != torch.float64:
        std = torch.where(overflow, _spread(rewards.double(), m.double()).to(std.dtype), std)
    return std


def stage1_summary(old_log_probs: torch.Tensor, data: GroupData) -> dict[str, float]:
    """The numbers behind :func:`plot_stage1`."""
    valid = old_log_probs[data.mask]
    label_lp = old_log_probs.gather(1, data.labels.unsqueeze(1)).squeeze(1)
    spread = reward_spread(data)
    return {
        "groups": float(len(data)),
        "old_logp_mean": float(valid.mean()),
        "label_logp_mean": float(label_lp.mean()),
        "uniform_logp_mean": float(-torch.log(data.mask.sum(1).float()).mean()),
        "reward_std_median": float(spread.median()),
        "frac_zero_spread": float((spread < 1e-8).float().mean()),
        "label_is_top_reward": label_reward_agreement(data),
    }
