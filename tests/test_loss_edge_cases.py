"""Three loss edge cases, each checked against a float64 computation written here from the definitions (loops over
groups and entries, no v3kit code): rewards whose float32 squares overflow, ``samples: sampled`` with
``drop_zero_std_groups``, and the adaptive KL coefficient's floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v3kit.config import ConfigError, load_config
from v3kit.train.grpo import GRPOConfig, grpo_step_loss
from v3kit.train.losses import AdaptiveKLController, group_advantages, normalize_rewards


# ----------------------------------------------------------------------------------------------- references
def ref_zscore(rewards: list[float], eps: float) -> list[float]:
    """``(r - mean) / (std + eps)`` in float64, Bessel std; a group without spread is all 0."""
    r = [float(x) for x in rewards]
    n = len(r)
    mean = sum(r) / n
    if max(r) == min(r):
        return [0.0] * n
    # scaled by the largest |r| so the float64 squares stay finite for any float32 input
    u = max(abs(x) for x in r)
    var = sum(((x - mean) / u) ** 2 for x in r) / (n - 1)
    std = u * math.sqrt(var)
    return [(x - mean) / (std + eps) for x in r]


# ----------------------------------------------------------------------------------------------- (a) overflow
HUGE = [
    [1e20, -1e20, 0.0],  # the probe's group: float32 gave [0, 0, 0]
    [3e38, 3e38, -3e38],  # the sum itself overflows float32
    [2e19, 1e19, 3e19],
    [1.0, 2.0, 4.0],  # an ordinary group beside them keeps its float32 numbers
]


@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_huge_rewards_are_standardised_like_float64(eps):
    rewards = torch.tensor(HUGE, dtype=torch.float32)
    got = group_advantages(rewards, eps=eps).double().numpy()
    want = np.array([ref_zscore(torch.tensor(g, dtype=torch.float32).double().tolist(), eps) for g in HUGE])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got[0].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)  # not the [0, 0, 0] of the probe
    # the ordinary group's numbers are those of the plain float32 formula, bit for bit
    plain = group_advantages(rewards[3:], eps=eps)
    assert torch.equal(group_advantages(rewards, eps=eps)[3:], plain)


def test_huge_rewards_zscore_of_rce_and_batch_scale_stay_finite_and_right():
    rewards = torch.tensor(HUGE, dtype=torch.float32)
    z = normalize_rewards(rewards, how="zscore").double().numpy()
    want = np.array([ref_zscore(torch.tensor(g, dtype=torch.float32).double().tolist(), 0.0) for g in HUGE])
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
    # batch scale: centred per group, divided by the std of every reward of the batch (float64 reference)
    r64 = rewards.double()
    flat = r64.flatten().tolist()
    u = max(abs(x) for x in flat)
    m = sum(flat) / len(flat)
    std = u * math.sqrt(sum(((x - m) / u) ** 2 for x in flat) / (len(flat) - 1))
    want_b = [[(x - sum(g) / len(g)) / (std + 1e-4) for x in g] for g in r64.tolist()]
    got_b = group_advantages(rewards, scale="batch").double().numpy()
    assert np.isfinite(got_b).all()
    want_b = np.array(want_b)
    # within each group, float32 rounding of the inputs is relative to the group's largest advantage
    assert (np.abs(got_b - want_b) <= 1e-5 * np.abs(want_b).max(axis=1, keepdims=True)).all()


# ----------------------------------------------------------------------------------------------- (b) sampled + drop
def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 5, generator=g)
    old_logits = logits + 0.3 * torch.randn(4, 5, generator=g)
    ref_logits = logits + 0.5 * torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[3, 4] = False
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0],  # no spread: always dropped
            [0.0, 1.0, 2.0, 3.0, 4.0],
            [2.0, 2.0, 2.0, 2.0, 2.0],  # no spread: always dropped
            [0.0, 5.0, 1.0, 3.0, 0.0],
        ]
    )

    def lsm(x):
        return torch.log_softmax(x.masked_fill(~mask, float("-inf")), dim=1)

    return lsm(logits), lsm(old_logits), lsm(ref_logits), rewards, mask


def ref_sampled_loss(logp, old, ref, rewards, mask, idx, cfg: GRPOConfig) -> float:
    """float64 GRPO loss of ``samples: sampled`` + ``drop_zero_std_groups`` from the definitions: a group whose
    draws have no reward spread leaves every term; the policy term is the mean over the kept draws of the clipped
    surrogate; the exact KL (against ``ref``) and the entropy bonus are means over the kept groups of full-group
    sums. Every group dropped: a mean over nothing, 0."""
    lp, ol, rf, rw = (t.double().tolist() for t in (logp, old, ref, rewards))
    pg_terms, kls, ents = [], [], []
    for b in range(len(lp)):
        draws = idx[b].tolist()
        r = [rw[b][c] for c in draws]
        if max(r) == min(r):
            continue
        adv = ref_zscore(r, cfg.adv_eps)
        for c, a in zip(draws, adv):
            ratio = math.exp(lp[b][c] - ol[b][c])
            clipped = min(max(ratio, 1 - cfg.eps_low), 1 + cfg.eps_low)
            pg_terms.append(-min(ratio * a, clipped * a))
        valid = [c for c in range(len(lp[b])) if mask[b, c]]
        kls.append(sum(math.exp(lp[b][c]) * (lp[b][c] - rf[b][c]) for c in valid))
        ents.append(-sum(math.exp(lp[b][c]) * lp[b][c] for c in valid))
    if not pg_terms:
        return 0.0
    mean = sum(pg_terms) / len(pg_terms)
    return mean + cfg.kl_beta * sum(kls) / len(kls) - cfg.entropy_coef * sum(ents) / len(ents)


SAMPLED = dict(
    samples="sampled",
    num_samples=6,
    drop_zero_std_groups=True,
    kl_estimator="exact",
    kl_reference="sft",
    entropy_coef=0.05,
    kl_beta=0.1,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_dropped_groups_leave_the_kl_and_entropy_terms(seed):
    logp, old, ref, rewards, mask = _batch(seed)
    cfg = GRPOConfig(**SAMPLED)
    # the draws the loss will make: the same generator state, drawn here first
    probs = torch.where(mask, old.exp(), torch.zeros_like(old))
    idx = torch.multinomial(probs, cfg.num_samples, replacement=True, generator=torch.Generator().manual_seed(seed))
    loss, stats = grpo_step_loss(
        logp, old, rewards, mask, cfg, ref_logp=ref, generator=torch.Generator().manual_seed(seed)
    )
    want = ref_sampled_loss(logp, old, ref, rewards, mask, idx, cfg)
    assert float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    # what the old code computed: the full groups' KL and entropy over all four groups, dropped ones included
    lp, rf = logp.double(), ref.double()
    p = lp.exp().masked_fill(~mask, 0.0)
    kl_all = (p * (lp - rf).masked_fill(~mask, 0.0)).sum(1).mean().item()
    kept = [b for b in range(4) if len(set(rewards[b, idx[b]].tolist())) > 1]
    kl_kept = (p * (lp - rf).masked_fill(~mask, 0.0)).sum(1)[kept].mean().item()
    assert float(stats["kl"]) == pytest.approx(kl_kept, rel=1e-5) and kl_kept != pytest.approx(kl_all, rel=1e-3)


def test_sampled_with_every_group_dropped_is_a_zero_loss_without_a_gradient():
    logp, old, ref, _, mask = _batch(0)
    rewards = torch.full_like(logp, 3.0)  # no group has any spread
    logp = logp.clone().requires_grad_(True)
    cfg = GRPOConfig(**SAMPLED)
    loss, stats = grpo_step_loss(logp, old, rewards, mask, cfg, ref_logp=ref, generator=torch.Generator())
    idx = torch.zeros(4, cfg.num_samples, dtype=torch.long)
    assert float(loss) == ref_sampled_loss(logp.detach(), old, ref, rewards, mask, idx, cfg) == 0.0
    assert not loss.requires_grad  # the runner takes no optimizer step for it
    assert stats["kl"] == 0.0 and stats["pg_loss"] == 0.0 and float(stats["frac_reward_zero_std"]) == 1.0


# ----------------------------------------------------------------------------------------------- (c) adaptive KL
def test_adaptive_kl_coefficient_never_underflows_to_zero_and_can_rise_again():
    init, target, horizon, batch = 0.1, 0.1, 7, 32
    factor = 1.0 + (-0.2) * batch / horizon  # a KL of 0 is far below target: the clipped error is -0.2
    # float64 by hand: without a floor the coefficient is the smallest subnormal after 302 steps, 0 at the next
    value = init
    for _ in range(302):
        value *= factor
    assert value == 5e-324 and value * factor == 0.0
    unfloored = AdaptiveKLController(init, target, horizon)
    floored = AdaptiveKLController(init, target, horizon, floor=GRPOConfig().kl_beta_min)
    for _ in range(303):
        unfloored.update(0.0, batch)
        floored.update(0.0, batch)
    assert unfloored.value == 0.0  # the old behaviour, still there at floor=0
    assert floored.value == GRPOConfig().kl_beta_min == 1e-8
    # a KL far above target raises it again by the clipped factor 1 + 0.2 * batch / horizon
    assert floored.update(10.0, batch) == pytest.approx(1e-8 * (1 + 0.2 * batch / horizon), rel=1e-12)


def test_kl_beta_min_is_a_config_field_refused_outside_its_range():
    cfg = load_config(None, ["grpo.kl_target=0.05", "grpo.kl_beta_min=0.001"])
    assert cfg.grpo.kl_beta_min == 0.001
    with pytest.raises(ConfigError, match=r"^grpo\.kl_beta_min must be in \[0, grpo\.kl_beta = 0\.1\]"):
        load_config(None, ["grpo.kl_target=0.05", "grpo.kl_beta_min=0.5"])
