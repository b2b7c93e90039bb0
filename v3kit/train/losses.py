"""The losses of the v3 pipeline, vectorised over groups.

Shapes: ``B`` groups (queries), ``G`` candidate slots per group, ``D`` embedding dim.
``mask[b, c]`` is True for a real candidate and False for padding in a ragged group;
masked entries never contribute to any sum, mean, softmax or statistic (formulas: ``docs/pipeline.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .masked import (  # noqa: F401 - check_mask, mean_over, std_over: their old path (v3kit.train.losses)
    check_mask,
    group_bessel_var,
    group_centred,
    masked_mean,
    mean_over,
    mean_weights,
    nonzero_std,
    std_over,
    unit_scale_zscore,
)

__all__ = [
    "ADV_SCALES",
    "KL_ESTIMATORS",
    "EXACT_KL",
    "LOSS_TYPES",
    "AdaptiveKLController",
    "group_entropy",
    "exact_group_kl",
    "LOG_RATIO_CLAMP",
    "group_log_probs",
    "REWARD_NORMS",
    "normalize_rewards",
    "rce_targets",
    "rce_loss",
    "group_advantages",
    "zero_std_groups",
    "kl_penalty",
    "grpo_loss",
    "grpo_loss_terms",
    "expected_advantage",
]

# exp() of a log-ratio beyond this overflows the useful range; clamping keeps a stale old policy from
# producing inf ratios (and inf * 0 = NaN gradients) while leaving any realistic ratio untouched.
LOG_RATIO_CLAMP = 20.0
ADV_SCALES = ("group", "batch", "none", "rloo")
LOSS_TYPES = ("ppo", "cispo")  # see grpo_loss
EXACT_KL = "exact"  # kl_estimator of the whole-group KL(pi || anchor) = sum_c pi log(pi / anchor)
KL_ESTIMATORS = ("seed", "k1", "k2", "k3")
# Per-group reward normalisation before RCE's temperature softmax: "none" (raw rewards, the seed), "zscore"
# ((r - mean_g) / std_g: targets then ignore the reward's scale and offset), "rank" (average within-group rank in
# [0, 1]: targets depend only on the reward's order).
REWARD_NORMS = ("none", "zscore", "rank")


def group_log_probs(
    query_emb: Tensor, cand_emb: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """``log softmax_c(<q, c> / temperature)`` over each group's valid candidates; masked entries are ``-inf``."""
    if query_emb.dim() != 2 or cand_emb.dim() != 3:
        raise ValueError(
            f"query_emb must be [B, D] and cand_emb [B, G, D]; got {tuple(query_emb.shape)} and {tuple(cand_emb.shape)}"
        )
    if query_emb.shape[0] != cand_emb.shape[0] or query_emb.shape[1] != cand_emb.shape[2]:
        raise ValueError(
            f"cand_emb {tuple(cand_emb.shape)} does not match query_emb {tuple(query_emb.shape)}: "
            "batch size and embedding dim must agree"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = check_mask(mask, cand_emb)
    return score_log_probs(torch.einsum("bd,bgd->bg", query_emb, cand_emb), temperature, mask)


def score_log_probs(group_scores: Tensor, temperature: float | Tensor, mask: Tensor | None) -> Tensor:
    """``log softmax_c(scores / temperature)`` over each group's valid candidates (``-inf`` at padding): the policy
    of every ranker, towers (:func:`group_log_probs`) or scorer. The one home of the group log-softmax. A tensor
    ``temperature`` (the stacked trainer's per-member ``[K, 1, 1]``, its values checked by the configs) broadcasts
    over stacked scores ``[K, B, G]``. ``mask=None``: no padding at all (the same values, without the fill)."""
    if not isinstance(temperature, Tensor) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is not None and mask.shape != group_scores.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the scores are {tuple(group_scores.shape)}")
    logits = group_scores / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask.to(torch.bool), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def normalize_rewards(rewards: Tensor, mask: Tensor | None = None, how: str = "none", eps: float = 1e-8) -> Tensor:
    """Per-group reward normalisation (see :data:`REWARD_NORMS`); masked entries come back as 0.

    ``zscore`` uses the Bessel std (as :func:`group_advantages`); a group without spread becomes all 0 (uniform
    targets). ``rank`` gives each valid candidate ``(#lower + (#equal - 1) / 2) / (n - 1)``: 1 for the best, 0 for
    the worst, ties share their average rank.
    """
    if how not in REWARD_NORMS:
        raise ValueError(f"reward_norm must be one of {REWARD_NORMS}, got {how!r}")
    mask = check_mask(mask, rewards, allow_empty=True)
    zeros = torch.zeros_like(rewards)
    if how == "none":
        return torch.where(mask, rewards, zeros)
    if how == "zscore":
        centred, n = group_centred(rewards, mask)
        std = group_bessel_var(centred, n).sqrt()
        z = torch.where(std > eps, centred / std.clamp_min(eps), zeros)
        # groups whose squares overflow (|r| above ~1.8e19 in float32) are standardised at unit scale
        return torch.where(torch.isfinite(std), z, torch.where(mask, unit_scale_zscore(rewards, mask, 0.0), zeros))
    n = mask.to(rewards.dtype).sum(dim=1, keepdim=True)
    pair = mask.unsqueeze(1) & mask.unsqueeze(2)  # [B, c, c']: both valid
    lower = ((rewards.unsqueeze(2) > rewards.unsqueeze(1)) & pair).sum(dim=2).to(rewards.dtype)
    equal = ((rewards.unsqueeze(2) == rewards.unsqueeze(1)) & pair).sum(dim=2).to(rewards.dtype)
    rank = (lower + (equal - 1).clamp_min(0) / 2) / (n - 1).clamp_min(1)
    return torch.where(mask, rank, zeros)


def rce_targets(
    labels: Tensor,
    rewards: Tensor,
    temperature: float,
    *,
    mask: Tensor | None = None,
    label_weight: float = 0.0,
    reward_norm: str = "none",
) -> Tensor:
    """RCE target distribution ``label_weight * onehot(label) + (1 - label_weight) * softmax(norm(rewards) / T)``
    with ``norm`` from :func:`normalize_rewards` (``"none"``: the raw rewards)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
    mask = check_mask(mask, rewards)
    if reward_norm != "none":
        rewards = normalize_rewards(rewards, mask, reward_norm)
    scaled = (rewards / temperature).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scaled, dim=-1)
    onehot = torch.nn.functional.one_hot(labels.long(), rewards.shape[1]).to(weights.dtype)
    return label_weight * onehot + (1.0 - label_weight) * weights


def rce_loss(
    query_emb: Tensor,
    cand_emb: Tensor,
    labels: Tensor,
    rewards: Tensor,
    temperature: float,
    *,
    mask: Tensor | None = None,
    label_weight: float = 0.0,
    sim_temperature: float = 1.0,
    reward_norm: str = "none",
) -> Tensor:
    """Reward-weighted cross-entropy: ``-mean_b sum_c t[b, c] * logp[b, c]`` with ``t`` from :func:`rce_targets`.

    ``temperature`` divides the rewards (sharpens the targets as it anneals down); ``sim_temperature`` divides
    the similarities (the policy's own logit temperature).
    """
    logp = group_log_probs(query_emb, cand_emb, sim_temperature, mask)
    return rce_cross_entropy(logp, labels, rewards, temperature, label_weight=label_weight, reward_norm=reward_norm)


def rce_cross_entropy(
    logp: Tensor,
    labels: Tensor,
    rewards: Tensor,
    temperature: float,
    *,
    label_weight: float = 0.0,
    reward_norm: str = "none",
) -> Tensor:
    """:func:`rce_loss` on the policy's group log-probs ``logp`` ([B, G], ``-inf`` at padding), whatever model
    produced them (towers or a scorer)."""
    valid = torch.isfinite(logp)
    targets = rce_targets(labels, rewards, temperature, mask=valid, label_weight=label_weight, reward_norm=reward_norm)
    # 0 * -inf is NaN, so masked slots are zeroed explicitly rather than multiplied.
    per_entry = torch.where(valid, targets * logp, torch.zeros_like(logp))
    return -per_entry.sum(dim=1).mean()


def zero_std_groups(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """True for groups that carry no ranking signal: < 2 valid candidates or all valid rewards equal."""
    mask = check_mask(mask, rewards, allow_empty=True)
    big = torch.finfo(rewards.dtype).max
    r_max = rewards.masked_fill(~mask, -big).amax(dim=1)
    r_min = rewards.masked_fill(~mask, big).amin(dim=1)
    return (mask.sum(dim=1) < 2) | (r_max == r_min)


def group_advantages(
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    scale: str = "group",
    eps: float = 1e-4,
    baseline: float = 0.0,
    no_signal: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages.

    ``scale="group"``: ``(r - mean_g) / (std_g + eps)`` (GRPO, DeepSeekMath; Bessel std as in TRL);
    ``"batch"``: centred per group, scaled by the std of all valid rewards in the batch (TRL ``scale_rewards="batch"``);
    ``"none"``: ``r - mean_g`` (Dr. GRPO, Liu et al. 2025); ``"rloo"``: ``r - mean of the *other* valid rewards
    of the group`` = ``n / (n - 1) * (r - mean_g)`` (leave-one-out baseline, Ahmadian et al. 2024). Groups
    without signal (see :func:`zero_std_groups`)
    and masked entries get exactly 0; ``baseline`` is then subtracted from the remaining entries (seed form).
    ``no_signal``: :func:`zero_std_groups` of the same rewards and mask when the caller has it already.
    """
    if scale not in ADV_SCALES:
        raise ValueError(f"scale must be one of {ADV_SCALES}, got {scale!r}")
    mask = check_mask(mask, rewards, allow_empty=True)
    centred, n = group_centred(rewards, mask)
    if scale == "group":
        var = group_bessel_var(centred, n)
        adv = centred / (nonzero_std(var.sqrt(), centred, n, dim=1) + eps)
        # Rewards above ~1.8e19 (float32) overflow the squares: those groups (only) are standardised at unit scale
        adv = torch.where(torch.isfinite(var), adv, unit_scale_zscore(rewards, mask, eps))
    elif scale == "batch":
        flat = rewards[mask]
        std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
        if flat.numel() > 1 and not bool(torch.isfinite(std)):  # overflowing squares: work at unit scale
            unit = flat.abs().amax()
            flat = flat / unit
            centred = group_centred(torch.where(mask, rewards, torch.zeros_like(rewards)) / unit, mask)[0]
            std, eps = flat.std(), eps / unit
        adv = centred / (nonzero_std(std, flat - flat.mean(), flat.new_tensor(flat.numel())) + eps)
    elif scale == "rloo":
        adv = centred * n / (n - 1).clamp_min(1)
    else:
        adv = centred
    no_signal = zero_std_groups(rewards, mask) if no_signal is None else no_signal
    signal = (~no_signal).unsqueeze(1) & mask
    return torch.where(signal, adv - baseline if baseline else adv, torch.zeros_like(adv))


def kl_penalty(logp: Tensor, anchor_logp: Tensor, estimator: str) -> Tensor:
    """Per-entry KL estimate between the policy and an anchor policy, with ``d = logp - anchor_logp``.

    ``seed``: ``exp(d) - 1 - d`` (the seed's ``ratio - 1 - log ratio``); ``k1``: ``d``; ``k2``: ``d^2 / 2``;
    ``k3``: ``exp(-d) - 1 + d`` (Schulman's k3, used by DeepSeekMath against the reference model).
    Callers mask invalid entries; ``d`` is clamped so masked ``-inf - -inf`` never reaches ``exp``.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    d = (logp - anchor_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "seed":
        return torch.exp(d) - 1 - d
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.exp(-d) - 1 + d


def group_entropy(logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over groups of the policy's entropy ``-sum_c pi log pi`` over the valid candidates (differentiable).

    Every group weighs the same whatever its number of candidates (verl and TRL weigh each token, i.e. candidate)."""
    return _entropy(logp, check_mask(mask, logp))


def _entropy(logp: Tensor, mask: Tensor) -> Tensor:
    """:func:`group_entropy` for a mask already checked (also the logged ``entropy`` statistic)."""
    # Padding is -inf: exp(-inf) * -inf is NaN, and torch.where's backward multiplies that branch's 0 gradient by
    # the NaN derivative, so the padding is set to 0 *before* the product (0 * log 1 = 0, finite gradient).
    lp = torch.where(mask, logp, torch.zeros_like(logp))
    # Groups weigh equally: mean_b H_b, each query being one ranking decision. verl and TRL average the entropy over
    # tokens (here: candidates), sum_b n_b H_b / sum_b n_b, which would let large groups dominate on ragged data
    # (groups of 4 and 1 uniform candidates: log(4) / 2 = 0.693 here, 4 log(4) / 5 = 1.109 there).
    return -torch.where(mask, lp.exp() * lp, torch.zeros_like(logp)).sum(dim=1).mean()


def exact_group_kl(logp: Tensor, anchor_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-group ``KL(pi || anchor) = sum_c pi(c) (log pi(c) - log anchor(c))`` over the valid candidates ([B]).

    A ranker scores every candidate of the group, so it can take this sum exactly instead of estimating it from the
    sampled entries (k1/k2/k3 are single-sample estimators of it). Both are log-softmaxes, finite on the valid
    candidates, so each term is finite and the log-ratio is not clamped (a clamp would cap a large KL and its
    gradient). Padding (``-inf``) is set to 0 *before* the arithmetic: ``-inf - -inf`` would be NaN in the value,
    and through ``torch.where``'s backward in the gradient too."""
    mask = check_mask(mask, logp)
    zeros = torch.zeros_like(logp)
    lp, la = torch.where(mask, logp, zeros), torch.where(mask, anchor_logp, zeros)
    return torch.where(mask, lp.exp() * (lp - la), zeros).sum(dim=1)


class AdaptiveKLController:
    """verl's ``AdaptiveKLController`` (after Ziegler et al. 2019): after each step the KL coefficient is multiplied
    by ``1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``, so it rises while the KL is above ``target``
    and falls while below, by at most 20% per ``horizon`` samples. A step of ``n_steps >= 5 * horizon`` samples is
    refused: its factor ``1 - 0.2 * n_steps / horizon`` could reach 0 or turn the coefficient negative (verl does not
    check; ``GRPOConfig`` refuses such a ``kl_horizon`` up front). The coefficient never falls below ``floor``:
    a factor < 1 repeated (a KL far below target, a short horizon) underflows it to exactly 0 after a few hundred
    steps (0.1 x 0.086^302 at horizon 7, batch 32), and a multiplicative controller at 0 stays there for good."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int, floor: float = 0.0) -> None:
        if not target > 0 or horizon < 1:
            raise ValueError(f"kl target must be > 0 and horizon >= 1, got {target} and {horizon}")
        if not 0 <= floor <= init_kl_coef:
            raise ValueError(f"the KL coefficient's floor must be in [0, {init_kl_coef}], got {floor}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.floor = float(floor)

    def update(self, current_kl: float, n_steps: int) -> float:
        if n_steps >= 5 * self.horizon:
            raise ValueError(
                f"an adaptive KL step of {n_steps} samples needs horizon > {n_steps / 5:g} (got "
                f"{self.horizon}): the coefficient would be scaled by a factor <= 0"
            )
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.value * (1.0 + error * n_steps / self.horizon), self.floor)
        return self.value


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, **options: Any) -> tuple[Tensor, dict[str, float]]:
    """:func:`grpo_loss_terms` (same arguments and options) with its statistics as python floats."""
    loss, stats = grpo_loss_terms(logp, old_logp, advantages, **options)
    return loss, {k: v.item() for k, v in stats.items()}


def grpo_loss_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    mask: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    kl_beta: float = 0.1,
    ref_logp: Tensor | None = None,
    kl_estimator: str | None = None,
    weights: Tensor | None = None,
    dual_clip: float | None = None,
    loss_type: str = "ppo",
    entropy_coef: float = 0.0,
    full_groups: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clipped group-relative policy loss plus KL penalty, averaged over valid entries.

    The statistics are 0-d tensors on the device (a training loop reads them back in batches, never waiting for
    the device every step); :func:`grpo_loss` returns them as python floats.

    KL: against ``old_logp`` with the seed's estimator when ``ref_logp`` is None, else k3 against ``ref_logp``;
    ``kl_estimator`` overrides the estimator. ``eps_high`` > ``eps_low`` is DAPO's clip-higher; ``dual_clip=c``
    bounds the loss of negative-advantage entries at ``-c * A`` (Ye et al. 2020). ``weights`` turn the mean into a
    weighted mean (the ``exact`` mode weights every candidate by its old-policy probability).
    ``kl_estimator="exact"`` adds ``kl_beta * mean_b KL_b`` with the whole-group KL of :func:`exact_group_kl`
    instead of a per-entry estimate. ``loss_type="cispo"`` replaces the clipped surrogate by
    ``-sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * logp`` (MiniMax-M1's CISPO): the importance weight is clipped
    and detached, so a clipped entry keeps the gradient ``-w * A`` of its log-prob instead of losing it.
    ``entropy_coef`` subtracts ``entropy_coef * mean_b H(pi_b)`` (entropy bonus; full groups, see
    :func:`group_entropy`). ``full_groups``: ``(logp, anchor_logp, mask)`` of the full groups the entries were drawn
    from (GRPO's ``samples="sampled"``); the entropy and an exact KL are then those of the full groups: over the
    draws, the exact sum would count repeated candidates twice and miss the undrawn ones (it can even go negative).
    Returns the loss and the stats: ``kl``, ``entropy``, ``clip_ratio`` (TRL's names; with the low and high
    sides apart as ``clip_ratio/low_mean`` and ``clip_ratio/high_mean``, so clip-higher's effect shows), ``pg_loss``
    (the clipped surrogate alone, verl's name) and ``ratio_mean``/``ratio_min``/``ratio_max``.
    """
    eps_high = eps_low if eps_high is None else eps_high
    _check_grpo_inputs(logp, old_logp, advantages, ref_logp, eps_low, eps_high, dual_clip, loss_type)
    mask = check_mask(mask, logp)
    zeros = torch.zeros_like(logp)

    log_ratio = torch.where(mask, logp - old_logp, zeros).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages, zeros)
    pg = -_surrogate(ratio, adv, logp, mask, eps_low, eps_high, dual_clip, loss_type)
    # The entropy (and an exact KL) of the full groups the entries were drawn from, when they were drawn.
    ent_logp, ent_mask = (
        (logp, mask) if full_groups is None else (full_groups[0], check_mask(full_groups[2], full_groups[0]))
    )

    if kl_estimator is None:
        kl_estimator = "seed" if ref_logp is None else "k3"
    anchor = old_logp if ref_logp is None else ref_logp
    shared = mean_weights(pg, mask, weights)
    if kl_estimator == EXACT_KL:
        kl_groups = exact_group_kl(logp, anchor, mask) if full_groups is None else exact_group_kl(*full_groups)
        loss = masked_mean(pg, mask, shared=shared) + kl_beta * kl_groups.mean()
    else:
        kl = kl_penalty(torch.where(mask, logp, zeros), torch.where(mask, anchor, zeros), kl_estimator)
        loss = masked_mean(pg + kl_beta * kl, mask, shared=shared)
    if entropy_coef:
        loss = loss - entropy_coef * group_entropy(ent_logp, ent_mask)

    with torch.no_grad():
        clipped_low = (ratio < 1.0 - eps_low) & (adv < 0)
        clipped_high = (ratio > 1.0 + eps_high) & (adv > 0)
        clipped = clipped_low | clipped_high
        stats = {
            "pg_loss": masked_mean(pg, mask, shared=shared),
            "kl": kl_groups.mean() if kl_estimator == EXACT_KL else masked_mean(kl, mask, shared=shared),
            "clip_ratio": mean_over(clipped.float(), mask),
            "clip_ratio/low_mean": mean_over(clipped_low.float(), mask),
            "clip_ratio/high_mean": mean_over(clipped_high.float(), mask),
            **_ratio_summary(ratio, mask),
            "entropy": _entropy(ent_logp, ent_mask),
        }
    return loss, stats


def _surrogate(
    ratio: Tensor,
    adv: Tensor,
    logp: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    loss_type: str,
) -> Tensor:
    """The surrogate objective per entry (padding: 0): PPO's clipped ratio x advantage (with ``dual_clip``, bounded
    below at ``dual_clip * A`` where A < 0), or CISPO's detached clipped ratio x advantage x log-prob."""
    if loss_type == "cispo":
        w = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high).detach()
        return w * adv * torch.where(mask, logp, torch.zeros_like(logp))
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    if dual_clip is not None:
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)
    return surrogate


def _check_grpo_inputs(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Tensor | None,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
    loss_type: str,
) -> None:
    """One line naming the argument for a shape or an option :func:`grpo_loss_terms` cannot take."""
    if logp.shape != old_logp.shape or logp.shape != advantages.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and advantages {tuple(advantages.shape)} "
            "must have the same [B, G] shape"
        )
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)}, expected {tuple(logp.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low} and {eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _ratio_summary(ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``ratio_mean`` / ``ratio_min`` / ``ratio_max`` over valid entries (CPU: one boolean index, as before)."""
    if ratio.device.type == "cpu":
        valid = ratio[mask]
        return {"ratio_mean": valid.mean(), "ratio_min": valid.min(), "ratio_max": valid.max()}
    inf = torch.full_like(ratio, float("inf"))  # min/max are exact however they are reduced
    return {
        "ratio_mean": mean_over(ratio, mask),
        "ratio_min": torch.where(mask, ratio, inf).amin(),
        "ratio_max": torch.where(mask, ratio, -inf).amax(),
    }


def expected_advantage(logp: Tensor, advantages: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-group ``sum_c pi(c) A(c)``: what sampling candidates from the policy estimates, without the noise."""
    mask = check_mask(mask, logp)
    probs = torch.where(mask, torch.exp(logp), torch.zeros_like(logp))
    return (probs * torch.where(mask, advantages, torch.zeros_like(advantages))).sum(dim=1)
