"""GRPO remedies as switches: entropy bonus, adaptive KL, exact group KL, CISPO, RLOO; each against a hand computation."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from v3kit.config import ConfigError, load_config
from v3kit.train.grpo import GRPOConfig, grpo_step_loss
from v3kit.train.losses import AdaptiveKLController, exact_group_kl, group_advantages, grpo_loss


def batch(seed: int = 0, B: int = 5, G: int = 4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, G, dtype=torch.bool)
    mask[0, 3] = mask[1, 2:] = False
    logits = torch.randn(B, G, generator=g).masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(logits, 1)
    old = torch.log_softmax((logits + 0.5 * torch.randn(B, G, generator=g)).masked_fill(~mask, float("-inf")), 1)
    rewards = torch.where(mask, torch.randn(B, G, generator=g), torch.zeros(()))
    return logp, old, rewards, mask


def valid(mask: torch.Tensor):
    return [(b, c) for b in range(mask.shape[0]) for c in range(mask.shape[1]) if mask[b, c]]


def test_entropy_bonus_subtracts_coef_times_mean_group_entropy():
    logp, old, rewards, mask = batch()
    adv = group_advantages(rewards, mask)
    base, _ = grpo_loss(logp, old, adv, mask=mask)
    bonus, _ = grpo_loss(logp, old, adv, mask=mask, entropy_coef=0.05)
    ent = (
        sum(-sum(math.exp(float(logp[b, c])) * float(logp[b, c]) for c in range(4) if mask[b, c]) for b in range(5)) / 5
    )
    assert float(base - bonus) == pytest.approx(0.05 * ent, rel=1e-5)
    # in sampled mode the bonus still uses the full groups
    cfg0, cfg1 = GRPOConfig(samples="sampled"), GRPOConfig(samples="sampled", entropy_coef=0.05)
    l0, _ = grpo_step_loss(logp, old, rewards, mask, cfg0, generator=torch.Generator().manual_seed(1))
    l1, _ = grpo_step_loss(logp, old, rewards, mask, cfg1, generator=torch.Generator().manual_seed(1))
    assert float(l0 - l1) == pytest.approx(0.05 * ent, rel=1e-5)


def test_entropy_bonus_gradient_is_finite_with_padding():
    """Padded groups (-inf log-probs) once made the bonus's gradient NaN; it must equal dH/dlogits by hand."""
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = mask[1, 2:] = False
    logits = torch.randn(3, 4, generator=g).requires_grad_(True)
    logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), 1)
    from v3kit.train.losses import group_entropy

    group_entropy(logp, mask).backward()
    assert torch.isfinite(logits.grad).all()
    for b in range(3):  # dH/dz_c = -p_c (log p_c + H) for one group's softmax, over the mean of 3 groups
        cs = [c for c in range(4) if mask[b, c]]
        p = [math.exp(float(logp[b, c])) for c in cs]
        h = -sum(pi * math.log(pi) for pi in p)
        for c, pi in zip(cs, p):
            assert float(logits.grad[b, c]) == pytest.approx(-pi * (math.log(pi) + h) / 3, abs=1e-6)
        assert all(float(logits.grad[b, c]) == 0.0 for c in range(4) if not mask[b, c])


def test_exact_kl_is_the_whole_group_sum():
    logp, old, rewards, mask = batch()
    kl = exact_group_kl(logp, old, mask)
    for b in range(5):
        want = sum(math.exp(float(logp[b, c])) * (float(logp[b, c]) - float(old[b, c])) for c in range(4) if mask[b, c])
        assert float(kl[b]) == pytest.approx(want, abs=1e-6) and want >= 0
    adv = group_advantages(rewards, mask)
    with_kl, stats = grpo_loss(logp, old, adv, mask=mask, kl_beta=0.3, kl_estimator="exact")
    no_kl, _ = grpo_loss(logp, old, adv, mask=mask, kl_beta=0.0, kl_estimator="exact")
    assert float(with_kl - no_kl) == pytest.approx(0.3 * float(kl.mean()), rel=1e-5)
    assert stats["kl"] == pytest.approx(float(kl.mean()), rel=1e-6)


def test_cispo_keeps_a_gradient_on_clipped_entries():
    logp0, old, rewards, mask = batch()
    adv = group_advantages(rewards, mask)
    grads = {}
    for lt in ("ppo", "cispo"):
        logp = logp0.clone().requires_grad_(True)
        loss, _ = grpo_loss(logp, old, adv, mask=mask, kl_beta=0.0, loss_type=lt, eps_low=0.1)
        loss.backward()
        grads[lt] = logp.grad
    n = int(mask.sum())
    clipped = 0
    for b, c in valid(mask):
        r = math.exp(float(logp0[b, c] - old[b, c]))
        a = float(adv[b, c])
        w = min(max(r, 0.9), 1.1)
        assert float(grads["cispo"][b, c]) == pytest.approx(-w * a / n, abs=1e-6)  # d/dlogp of -sg(w) A logp
        if (r > 1.1 and a > 0) or (r < 0.9 and a < 0):
            clipped += 1
            assert float(grads["ppo"][b, c]) == 0.0 and float(grads["cispo"][b, c]) != 0.0
    assert clipped > 0


def test_rloo_advantage_is_reward_minus_mean_of_the_others():
    _, _, rewards, mask = batch()
    adv = group_advantages(rewards, mask, scale="rloo")
    for b, c in valid(mask):
        others = [float(rewards[b, j]) for j in range(4) if mask[b, j] and j != c]
        assert float(adv[b, c]) == pytest.approx(float(rewards[b, c]) - sum(others) / len(others), abs=1e-6)


def test_adaptive_kl_controller_follows_verl_rule():
    ctl = AdaptiveKLController(0.1, target=0.05, horizon=100)
    assert ctl.update(0.10, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    v = ctl.value
    assert ctl.update(0.04, 10) == pytest.approx(v * (1 + (0.04 / 0.05 - 1) * 10 / 100))
    v = ctl.value
    assert ctl.update(0.0, 50) == pytest.approx(v * (1 - 0.2 * 50 / 100))


def test_adaptive_kl_adapts_kl_beta_per_step_in_a_real_run(tmp_path):
    from v3kit.pipeline import run_pipeline

    cfg = load_config(
        None,
        [
            "progress=false",
            "data.synthetic.n_queries=100",
            "sft.epochs=1",
            "rce.epochs=0",
            "grpo.epochs=2",
            "grpo.lr=1e-3",
            "grpo.kl_target=0.001",
            "grpo.kl_horizon=200",
            f"run_dir={tmp_path}",
        ],
    )
    run_pipeline(cfg)
    m = pd.read_csv(tmp_path / "metrics.csv")
    g = m[(m["stage"] == "grpo") & (m["split"] == "train")].reset_index(drop=True)
    assert g["kl_beta"].iloc[0] == pytest.approx(0.1)
    sizes = [32, 32, 6] * 2  # 70 training groups in batches of 32
    for i in range(1, len(g)):
        err = min(max(g["kl"].iloc[i - 1] / 0.001 - 1, -0.2), 0.2)
        assert g["kl_beta"].iloc[i] == pytest.approx(g["kl_beta"].iloc[i - 1] * (1 + err * sizes[i - 1] / 200))
    assert g["kl_beta"].nunique() > 1


def test_remedy_switches_are_validated():
    for bad, needle in (
        ("grpo.loss_type=ppo2", "grpo.loss_type"),
        ("grpo.entropy_coef=-1", "entropy_coef"),
        ("grpo.kl_target=0", "kl_target"),
        ("grpo.kl_estimator=k4", "kl_estimator"),
    ):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [bad])
    cfg = load_config(None, ["grpo.kl_estimator=exact", "grpo.adv_scale=rloo", "grpo.loss_type=cispo"])
    assert (cfg.grpo.kl_estimator, cfg.grpo.adv_scale, cfg.grpo.loss_type) == ("exact", "rloo", "cispo")
