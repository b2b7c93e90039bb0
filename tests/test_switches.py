"""Each GRPO/RCE switch does what it claims (the suspects of docs/pipeline.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from v3kit.data import iterate_batches
from v3kit.pipeline import prepare_data, run_pipeline
from v3kit.train.grpo import GRPOConfig, grpo_step_loss, run_grpo
from v3kit.train.losses import expected_advantage, group_advantages, grpo_loss
from v3kit.train.model import policy_log_probs
from v3kit.train.rce import RCEConfig, final_logit_temperature, run_rce
from v3kit.train.sft import load_sft, train_sft


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SFT + stage 1 + an RCE run with a large lr, so the policy has clearly moved away from the old policy."""
    run_dir = tmp_path_factory.mktemp("switches")
    cfg = tiny_config(run_dir)
    splits = prepare_data(cfg)
    train_sft(splits, cfg.model, cfg.sft, run_dir=run_dir, progress=False)
    stage1 = load_sft(run_dir / "sft.pt", splits.train)
    rce_policy = copy.deepcopy(stage1.policy)
    run_rce(rce_policy, splits, RCEConfig(epochs=2, lr=3e-3), reference=stage1.reference, progress=False)
    return splits, stage1, rce_policy


def grpo(world, **overrides):
    splits, stage1, rce_policy = world
    policy = copy.deepcopy(rce_policy)
    cfg = GRPOConfig(**{"epochs": 1, **overrides})
    return run_grpo(policy, splits, stage1.old_log_probs, cfg, reference=stage1.reference, progress=False)


def test_old_policy_sft_is_stale_after_rce(world):
    r = grpo(world, old_policy="sft")
    assert r.info["step0_outside_clip"] > 0.05  # RCE moved the policy: many ratios start outside [0.8, 1.2]
    assert abs(r.info["step0_ratio_mean"] - 1) > 1e-3 or r.info["step0_ratio_max"] > 1.2


def test_refresh_at_start_gives_ratio_one_at_the_first_step(world):
    r = grpo(world, old_policy="refresh_at_start")
    assert r.info["step0_ratio_min"] == 1.0 and r.info["step0_ratio_max"] == 1.0
    assert r.info["step0_outside_clip"] == 0.0
    first = r.train_history.iloc[0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["clip_ratio"] == 0.0


def test_refresh_each_epoch_resets_the_ratio_every_epoch(world):
    stale = grpo(world, old_policy="refresh_at_start", epochs=2, lr=3e-3)
    fresh = grpo(world, old_policy="refresh_each_epoch", epochs=2, lr=3e-3)
    first_of_epoch2 = lambda r: r.train_history[r.train_history.epoch == 2].iloc[0]  # noqa: E731
    assert fresh.info["step0_ratio_min"] == fresh.info["step0_ratio_max"] == 1.0  # step 0 sees the refresh
    assert abs(first_of_epoch2(fresh)["ratio_max"] - 1) < 1e-4
    assert abs(first_of_epoch2(stale)["ratio_max"] - 1) > 1e-3


def test_kl_reference_sft_anchors_to_sft_not_to_old(world):
    old = grpo(world, old_policy="refresh_at_start", kl_reference="old")
    sft = grpo(world, old_policy="refresh_at_start", kl_reference="sft")
    # Against a freshly refreshed old policy the KL starts at 0; against SFT it sees the RCE drift.
    assert old.train_history.iloc[0]["kl"] == pytest.approx(0.0, abs=1e-8)
    assert sft.train_history.iloc[0]["kl"] > 1e-3


def test_step_loss_routes_every_switch_to_the_loss():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    old = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(4, 5, dtype=torch.float64), -1)
    rewards = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.bool)
    cfg = GRPOConfig(
        kl_beta=0.3,
        eps_low=0.1,
        eps_high=0.3,
        dual_clip=3.0,
        kl_estimator="k2",
        adv_scale="none",
        baseline=0.1,
        kl_reference="sft",
    )
    got, _ = grpo_step_loss(logp, old, rewards, mask, cfg, ref_logp=ref)
    adv = group_advantages(rewards, mask, scale="none", baseline=0.1)
    want, _ = grpo_loss(
        logp,
        old,
        adv,
        mask=mask,
        eps_low=0.1,
        eps_high=0.3,
        dual_clip=3.0,
        kl_beta=0.3,
        ref_logp=ref,
        kl_estimator="k2",
    )
    torch.testing.assert_close(got, want)


def test_adv_scale_changes_the_advantage_scale(world):
    group = grpo(world, adv_scale="group")
    none = grpo(world, adv_scale="none")
    # Group-normalised advantages have unit std within groups; raw centred rewards keep the reward scale.
    assert group.train_history["adv_std"].mean() == pytest.approx(0.95, abs=0.1)
    assert abs(none.train_history["adv_std"].mean() - group.train_history["adv_std"].mean()) > 0.1


def test_drop_zero_std_groups_removes_them_from_the_mean():
    logp = torch.log_softmax(torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.1, 0.0]], dtype=torch.float64), -1)
    old = logp.detach() + torch.tensor([[0.05, -0.1, 0.02], [0.1, -0.05, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)  # group 0: no signal
    mask = torch.ones(2, 3, dtype=torch.bool)
    kept, stats = grpo_step_loss(logp, old, rewards, mask, GRPOConfig(drop_zero_std_groups=False))
    dropped, stats_d = grpo_step_loss(logp, old, rewards, mask, GRPOConfig(drop_zero_std_groups=True))
    only_signal, _ = grpo_step_loss(logp[1:], old[1:], rewards[1:], mask[1:], GRPOConfig())
    torch.testing.assert_close(dropped, only_signal)
    assert not torch.allclose(kept, dropped)
    assert stats["frac_reward_zero_std"] == stats_d["frac_reward_zero_std"] == 0.5


def test_exact_mode_matches_monte_carlo_expected_advantage():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    old = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
    logp = torch.log_softmax(
        (logits + 0.1 * torch.randn(3, 6, generator=gen, dtype=torch.float64)).masked_fill(~mask, float("-inf")), -1
    )
    rewards = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    cfg = GRPOConfig(samples="exact", kl_beta=0.0, eps_low=0.99, eps_high=10.0)  # clip out of the way
    loss, _ = grpo_step_loss(logp, old, rewards, mask, cfg)
    adv = group_advantages(rewards, mask)
    # Importance sampling: E_{c ~ old}[ratio(c) A(c)] = sum_c pi(c) A(c), the expected advantage under pi.
    torch.testing.assert_close(-loss, expected_advantage(logp, adv, mask).mean())
    # Monte Carlo: sample candidates from the current policy and average their advantage.
    draws = torch.multinomial(logp.exp().nan_to_num(0.0), 200_000, replacement=True, generator=gen)
    mc = adv.gather(1, draws).mean(1).mean()
    assert float(-loss) == pytest.approx(float(mc), abs=5e-3)


def test_sampled_mode_draws_from_the_old_policy():
    # An old policy sure of candidate 2: every draw is candidate 2, so every sampled group has zero reward std.
    old = torch.log(torch.tensor([[1e-12, 1e-12, 1.0 - 2e-12, 1e-12]], dtype=torch.float64)).repeat(5, 1)
    logp = torch.log_softmax(torch.zeros(5, 4, dtype=torch.float64, requires_grad=True), -1)
    rewards = torch.arange(4.0, dtype=torch.float64).repeat(5, 1)
    mask = torch.ones(5, 4, dtype=torch.bool)
    cfg = GRPOConfig(samples="sampled", num_samples=4, kl_beta=0.0)
    _, stats = grpo_step_loss(logp, old, rewards, mask, cfg, generator=torch.Generator().manual_seed(0))
    assert stats["frac_reward_zero_std"] == 1.0
    # A uniform old policy gives spread; draws are reproducible from the generator.
    uniform = torch.full((5, 4), -torch.log(torch.tensor(4.0, dtype=torch.float64)))
    a, sa = grpo_step_loss(logp, uniform, rewards, mask, cfg, generator=torch.Generator().manual_seed(1))
    b, _ = grpo_step_loss(logp, uniform, rewards, mask, cfg, generator=torch.Generator().manual_seed(1))
    assert sa["frac_reward_zero_std"] < 1.0 and torch.equal(a, b)
    assert sa["entropy"] == pytest.approx(float(torch.log(torch.tensor(4.0))))  # full-group entropy


def test_logits_temperature_target_shows_up_as_a_temperature_mismatch(tmp_path):
    rce_cfg = RCEConfig(temperature_target="logits", epochs=1)
    assert final_logit_temperature(rce_cfg, 1.0) == 0.5
    assert final_logit_temperature(RCEConfig(temperature_target="rewards"), 1.0) == 1.0
    mismatch = run_pipeline(tiny_config(tmp_path / "a", "rce.temperature_target=logits", "rce.epochs=1"))
    matched = run_pipeline(
        tiny_config(tmp_path / "b", "rce.temperature_target=logits", "rce.epochs=1", "grpo.logp_temperature=1.0")
    )
    assert mismatch.grpo.info["temperature"] == 0.5 and matched.grpo.info["temperature"] == 1.0
    # RCE's epoch 0 reads the untouched SFT policy at SFT's own temperature: the curves start at the baseline.
    assert mismatch.rce.eval_history.iloc[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-7)
    # Old log-probs come from stage 1 at T=1; reading the policy at T=0.5 alone pushes ratios off 1.
    assert mismatch.grpo.info["step0_ratio_std"] > 10 * matched.grpo.info["step0_ratio_std"]


def test_clip_higher_and_dual_clip_change_the_clipping_in_a_run(world):
    base = grpo(world, old_policy="sft", lr=3e-3)
    higher = grpo(world, old_policy="sft", lr=3e-3, eps_high=0.5)
    # Same first batch, same ratios: a wider upper bound can only clip fewer entries there.
    assert higher.train_history.iloc[0]["ratio_mean"] == base.train_history.iloc[0]["ratio_mean"]
    assert higher.train_history.iloc[0]["clip_ratio"] < base.train_history.iloc[0]["clip_ratio"]
    dual = grpo(world, old_policy="sft", lr=3e-3, dual_clip=1.5)
    # Dual clip bounds the loss of negative-advantage entries with huge ratios, so the first loss drops.
    assert dual.train_history.iloc[0]["pg_loss"] < base.train_history.iloc[0]["pg_loss"]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_switch_changes_the_logged_kl(world, estimator):
    seed_form = grpo(world, old_policy="sft", kl_reference="old")
    other = grpo(world, old_policy="sft", kl_reference="old", kl_estimator=estimator)
    assert other.train_history.iloc[0]["kl"] != seed_form.train_history.iloc[0]["kl"]


def test_rce_label_weight_one_is_supervised_ce(world):
    splits, stage1, _ = world
    policy = copy.deepcopy(stage1.policy)
    r = run_rce(policy, splits, RCEConfig(epochs=1, label_weight=1.0), progress=False)
    # With all target mass on the label the first RCE loss equals the SFT model's CE on that batch, whatever T.
    gen = torch.Generator().manual_seed(0)
    first = next(iterate_batches(splits.train, 32, shuffle=True, generator=gen))
    with torch.no_grad():
        logp = policy_log_probs(stage1.reference, first.query_x, first.cand_x, first.mask, 1.0)
    ce = -logp.gather(1, first.labels.unsqueeze(1)).mean().item()
    assert r.train_history.iloc[0]["loss"] == pytest.approx(ce, rel=1e-5)


def test_rce_temperature_rule_has_one_home():
    from v3kit.train.rce import RCEConfig, final_logit_temperature, rce_config_from

    on_rewards = RCEConfig()
    assert on_rewards.temperatures(0.7, 0.05) == (0.7, 0.05)  # T sharpens the targets; the policy keeps its own
    on_logits = RCEConfig(temperature_target="logits", reward_temperature=2.0)
    assert on_logits.temperatures(0.5, 0.1) == (2.0, 0.1 * 0.5)  # T scales the logits; the targets keep theirs
    assert final_logit_temperature(on_logits, 0.1) == 0.1 * on_logits.t_end
    assert final_logit_temperature(RCEConfig(temperature_target="logits", epochs=0), 0.1) == 0.1  # RCE off
    assert final_logit_temperature(on_rewards, 0.1) == 0.1
    assert rce_config_from({"t_end": 0.25, "not_a_key": 1}).t_end == 0.25 and rce_config_from(None) == RCEConfig()
