"""Masks and masked statistics over ragged groups: the arithmetic every loss and metric shares.

Shapes: ``B`` groups (queries), ``G`` candidate slots per group. ``mask[b, c]`` is True for a real candidate and
False for padding; masked entries never contribute. :func:`check_mask` validates a mask; the masked means and
stds reduce over the valid entries; the per-group statistics (:func:`group_centred`, :func:`group_bessel_var`)
are where RCE's ``zscore`` targets and GRPO's advantages start, with the fall-backs that keep them finite when
the rewards' squares overflow or underflow. :mod:`v3kit.train.losses` re-exports ``check_mask``, ``mean_over``
and ``std_over``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_mask(mask: Tensor | None, like: Tensor, name: str = "mask", *, allow_empty: bool = False) -> Tensor:
    """Return a boolean [B, G] mask (all True when None); raise a clear error on bad shapes.

    Empty groups are an error where a softmax needs a candidate (checked for CPU tensors); ``allow_empty`` lets
    statistics treat them as groups without signal instead.
    """
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    if mask.shape != like.shape[:2]:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but must be [B, G] = {tuple(like.shape[:2])}")
    mask = mask.to(torch.bool)
    # Off the CPU the emptiness check would make the host wait for the device on every call (every training step);
    # there the data contract checks it instead, once, when the GroupData is built (every group has >= 2 candidates).
    if allow_empty or mask.device.type != "cpu":
        return mask
    empty = ~mask.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} has groups with no valid candidate (rows {rows}); every group needs at least one "
            "True entry — drop empty groups before batching"
        )
    return mask


def mean_weights(x: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The per-entry weights of :func:`masked_mean` and their clamped total (shareable by several means)."""
    w = mask.to(x.dtype) if weights is None else torch.where(mask, weights.to(x.dtype), torch.zeros_like(x))
    return w, w.sum().clamp_min(torch.finfo(x.dtype).tiny)


def masked_mean(
    x: Tensor, mask: Tensor, weights: Tensor | None = None, shared: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    w, total = mean_weights(x, mask, weights) if shared is None else shared
    return (torch.where(mask, x, torch.zeros_like(x)) * w).sum() / total


def mean_over(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x``'s valid entries as a 0-d tensor (NaN when none).

    On the CPU it is ``x[mask].mean()`` (the statistics logged so far, bit for bit); elsewhere a masked sum, since
    boolean indexing would wait for the device on every step.
    """
    if x.device.type == "cpu":
        return x[mask].mean()
    m = mask.to(x.dtype)
    return (torch.where(mask, x, torch.zeros_like(x)) * m).sum() / m.sum()


def std_over(x: Tensor, mask: Tensor) -> Tensor:
    """Bessel std of ``x``'s valid entries as a 0-d tensor, 0 when fewer than two (same CPU/device split as
    :func:`mean_over`)."""
    if x.device.type == "cpu":
        v = x[mask]
        return v.std() if v.numel() > 1 else x.new_zeros(())
    n = mask.sum()
    mean = mean_over(x, mask)
    var = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum() / (n - 1).clamp_min(1)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def group_centred(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rewards minus their group's mean over the valid entries (0 at padding), and each group's valid count
    ([B, 1]): the group statistics both RCE's ``zscore`` and GRPO's advantages start from."""
    r = torch.where(mask, rewards, torch.zeros_like(rewards))
    n = mask.to(rewards.dtype).sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / n.clamp_min(1)
    return torch.where(mask, r - mean, torch.zeros_like(r)), n


def group_bessel_var(centred: Tensor, n: Tensor) -> Tensor:
    """Per-group Bessel variance ([B, 1]) of :func:`group_centred`'s output."""
    return (centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp_min(1)


def unit_scale_zscore(rewards: Tensor, mask: Tensor, eps: float | Tensor) -> Tensor:
    """``(r - mean_g) / (std_g + eps)`` per group, computed on ``r / max_g |r|``: every intermediate stays within
    [-2, 2] (squares within [0, 4]), so no group's statistics can overflow whatever the rewards' magnitude. The
    same numbers up to rounding as the direct formula, which is kept for the groups it can compute (bit-identical
    runs); a group of huge rewards takes this one."""
    big = torch.finfo(rewards.dtype).max
    unit = torch.where(mask, rewards.abs(), torch.zeros_like(rewards)).amax(dim=1, keepdim=True)
    unit = unit.clamp(torch.finfo(rewards.dtype).tiny, big)
    centred, n = group_centred(torch.where(mask, rewards, torch.zeros_like(rewards)) / unit, mask)
    std = nonzero_std(group_bessel_var(centred, n).sqrt(), centred, n, dim=1)
    return centred / (std + eps / unit)


def nonzero_std(std: Tensor, centred: Tensor, count: Tensor, dim: int | None = None) -> Tensor:
    """``std`` where it is > 0, else the Bessel std of ``centred`` computed at unit scale.

    A spread whose square underflows (differences below ~1e-154 in float64, ~1e-19 in float32) gives ``std = 0``
    although the rewards differ, and at ``eps = 0`` infinite advantages; dividing by the largest deviation first
    keeps the squares representable. Ordinary rewards never take this branch, so their numbers do not change."""
    reduce = {"dim": dim, "keepdim": True} if dim is not None else {}
    unit = centred.abs().amax(**reduce) if centred.numel() else centred.new_zeros(())
    unit = unit.clamp_min(torch.finfo(centred.dtype).tiny)
    rescaled = unit * (((centred / unit) ** 2).sum(**reduce) / (count - 1).clamp_min(1)).sqrt()
    return torch.where(std > 0, std, rescaled)
