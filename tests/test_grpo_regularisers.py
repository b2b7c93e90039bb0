"""GRPO's regularisers against float64 hand computations: the exact group KL (on the full groups when the candidates
are sampled, and without a log-ratio clamp), the adaptive KL coefficient's sign, and the entropy bonus's weighting of
ragged groups."""

from __future__ import annotations

import math

import pytest
import torch

from v3kit.config import ConfigError, load_config
from v3kit.train.grpo import GRPOConfig, grpo_step_loss
from v3kit.train.losses import (
    AdaptiveKLController,
    exact_group_kl,
    group_advantages,
    group_entropy,
    grpo_loss,
    grpo_loss_terms,
)

F64 = torch.float64


def _kl(p: list[float], log_anchor: list[float]) -> float:
    """KL(p || anchor) = sum_c p_c (log p_c - log anchor_c) in float64, over the candidates with p_c > 0."""
    return math.fsum(pc * (math.log(pc) - la) for pc, la in zip(p, log_anchor) if pc > 0)


# ---------------------------------------------------------------------------
# sampled groups: the exact KL is the full groups'
# ---------------------------------------------------------------------------
PI = [0.7, 0.2, 0.1]
SAMPLED_EXACT = GRPOConfig(samples="sampled", num_samples=2, kl_beta=1.0, kl_estimator="exact", kl_reference="sft")


def _one_group():
    logp = torch.tensor([PI], dtype=F64).log()
    ref = torch.full((1, 3), math.log(1 / 3), dtype=F64)  # uniform reference
    rewards = torch.tensor([[1.0, 0.0, 0.5]], dtype=F64)
    return logp, ref, rewards, torch.ones(1, 3, dtype=torch.bool)


def _with_draws(monkeypatch, draws: list[int]) -> None:
    """Make the next torch.multinomial return ``draws`` for the one group (the draws the KL must not depend on)."""
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, **kw: torch.tensor([draws]))


@pytest.mark.parametrize("draws", [[2, 1], [0, 0]])
def test_sampled_exact_kl_is_the_full_groups_kl_whatever_the_draws(monkeypatch, draws):
    logp, ref, rewards, mask = _one_group()
    want = _kl(PI, [math.log(1 / 3)] * 3)
    assert want == pytest.approx(0.296794, abs=5e-7)  # the value quoted for this example
    # What a sum over the two draws would give instead (repeats twice, undrawn candidates missing): not a KL.
    over_draws = math.fsum(PI[c] * (math.log(PI[c]) - math.log(1 / 3)) for c in draws)
    assert over_draws == pytest.approx({(2, 1): -0.222562, (0, 0): 1.038712}[tuple(draws)], abs=5e-7)

    _with_draws(monkeypatch, draws)
    loss1, stats = grpo_step_loss(logp, logp, rewards, mask, SAMPLED_EXACT, ref_logp=ref)
    assert float(stats["kl"]) == pytest.approx(want, rel=1e-12)
    _with_draws(monkeypatch, draws)
    cfg0 = GRPOConfig(samples="sampled", num_samples=2, kl_beta=0.0, kl_estimator="exact", kl_reference="sft")
    loss0, _ = grpo_step_loss(logp, logp, rewards, mask, cfg0, ref_logp=ref)
    assert float(loss1 - loss0) == pytest.approx(want, rel=1e-12)  # the loss moves by kl_beta * KL, no more

    all_cfg = GRPOConfig(samples="all", kl_beta=1.0, kl_estimator="exact", kl_reference="sft")
    _, all_stats = grpo_step_loss(logp, logp, rewards, mask, all_cfg, ref_logp=ref)
    assert float(all_stats["kl"]) == float(stats["kl"])  # one formula on the same groups: bit for bit


def test_loss_terms_take_entropy_and_exact_kl_over_the_full_groups_the_draws_came_from():
    # Two full groups (one ragged) and two draws each, repeats included; old = the draws' own log-probs, so every
    # ratio is 1 and the policy term is -mean(advantage) over the draws.
    pi = [[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]
    anchor = [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25]]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = torch.tensor(pi, dtype=F64).log().masked_fill(~mask, -math.inf).requires_grad_(True)
    log_anchor = torch.tensor(anchor, dtype=F64).log()
    draws = torch.tensor([[0, 0], [1, 0]])
    adv = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=F64)
    beta, coef = 0.3, 0.05
    drawn = logp.gather(1, draws)
    loss, stats = grpo_loss_terms(
        drawn,
        drawn.detach(),
        adv,
        kl_beta=beta,
        ref_logp=log_anchor.gather(1, draws),
        kl_estimator="exact",
        entropy_coef=coef,
        full_groups=(logp, log_anchor, mask),
    )
    ent = [-math.fsum(p * math.log(p) for p in row if p > 0) for row in pi]
    kls = [_kl(row, [math.log(a) for a in arow]) for row, arow in zip(pi, anchor)]
    want = -math.fsum(adv.flatten().tolist()) / 4 + beta * math.fsum(kls) / 2 - coef * math.fsum(ent) / 2
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(stats["entropy"]) == pytest.approx(math.fsum(ent) / 2, rel=1e-12)
    assert float(stats["kl"]) == pytest.approx(math.fsum(kls) / 2, rel=1e-12)
    # The undrawn candidate (group 0, candidate 1 and 2) still gets the KL's and the entropy's gradient.
    (grad,) = torch.autograd.grad(loss, logp)
    assert float(grad[0, 2]) != 0.0 and torch.isfinite(grad[mask]).all() and float(grad[1, 2]) == 0.0


def test_sampled_exact_kl_on_ragged_batches_equals_all_and_carries_the_gradient():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 3:] = mask[2, 2:] = False
    logits = torch.randn(4, 5, generator=g, dtype=F64)
    old = torch.log_softmax(torch.randn(4, 5, generator=g, dtype=F64).masked_fill(~mask, -math.inf), 1)
    rewards = torch.where(mask, torch.randn(4, 5, generator=g, dtype=F64), torch.zeros(()))
    want = (
        math.fsum(
            _kl([math.exp(float(v)) for v in torch.log_softmax(logits[b][mask[b]], 0)], old[b][mask[b]].tolist())
            for b in range(4)
        )
        / 4
    )
    for kl_reference in ("old", "sft"):
        ref = old if kl_reference == "sft" else None
        kls, grads = [], []
        for samples, seed in (("all", 0), ("sampled", 1), ("sampled", 2)):
            z = logits.clone().requires_grad_(True)
            logp = torch.log_softmax(z.masked_fill(~mask, -math.inf), 1)
            cfg = GRPOConfig(
                samples=samples, kl_estimator="exact", kl_reference=kl_reference, kl_beta=1.0, num_samples=3
            )
            _, stats = grpo_step_loss(
                logp, old, rewards, mask, cfg, ref_logp=ref, generator=torch.Generator().manual_seed(seed)
            )
            kls.append(float(stats["kl"]))
            # the KL term's own gradient (pg switched off by zero rewards): the full groups' KL, finite at padding
            z.grad = None
            loss, _ = grpo_step_loss(
                logp,
                old,
                torch.zeros_like(rewards),
                mask,
                cfg,
                ref_logp=ref,
                generator=torch.Generator().manual_seed(seed),
            )
            loss.backward()
            grads.append(z.grad)
        assert kls[0] == pytest.approx(want, rel=1e-12) and kls[1] == kls[0] and kls[2] == kls[0]
        assert all(torch.isfinite(gr).all() and (gr[~mask] == 0).all() for gr in grads)
        assert torch.allclose(grads[1], grads[0], rtol=0, atol=1e-15) and torch.allclose(
            grads[2], grads[0], rtol=0, atol=1e-15
        )


# ---------------------------------------------------------------------------
# no clamp on the exact KL's log-ratio
# ---------------------------------------------------------------------------
def test_exact_kl_is_not_clamped_for_a_far_anchor():
    """pi = (0.5, 0.5) against an anchor (1 - e^-30, e^-30): the log-ratio of the second candidate is ~29.3, past the
    +-20 clamp of the per-entry estimators. KL = log 0.5 - log(1 - e^-30) / 2 + 15 = 14.3069 (a clamp at 20 gave 9.653)
    and dKL/dz_c = pi_c (log pi_c - log anchor_c - KL) = -+7.5 (a clamp gave -+4.92)."""
    la = [math.log1p(-math.exp(-30.0)), -30.0]
    want = _kl([0.5, 0.5], la)
    assert want == pytest.approx(14.306853, abs=5e-7)
    want_grad = [0.5 * (math.log(0.5) - a - want) for a in la]
    assert want_grad == pytest.approx([-7.5, 7.5], abs=5e-7)
    for dtype, rel in ((F64, 1e-12), (torch.float32, 1e-6)):
        z = torch.zeros(1, 2, dtype=dtype, requires_grad=True)
        anchor = torch.tensor([la], dtype=dtype)
        kl = exact_group_kl(torch.log_softmax(z, 1), anchor)
        kl.sum().backward()
        assert float(kl) == pytest.approx(want, rel=rel)
        assert z.grad[0].tolist() == pytest.approx(want_grad, rel=rel)
        # through the loss: the penalty and its statistic are the same unclamped KL
        loss, stats = grpo_loss(
            torch.log_softmax(z, 1), anchor, torch.zeros(1, 2, dtype=dtype), kl_beta=1.0, kl_estimator="exact"
        )
        assert stats["kl"] == pytest.approx(want, rel=rel) and float(loss) == pytest.approx(want, rel=rel)


def test_exact_kl_gradients_match_finite_differences_on_ragged_groups():
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    g = torch.Generator().manual_seed(4)
    z = (3 * torch.randn(3, 4, generator=g, dtype=F64)).requires_grad_(True)
    a = (3 * torch.randn(3, 4, generator=g, dtype=F64)).requires_grad_(True)
    a_far = a.detach().clone()
    a_far[0, 1] -= 40.0  # a log-ratio of ~40: past any clamp

    def kl(z_, a_):  # the padded logits reach nothing (masked to -inf before the softmax)
        return exact_group_kl(
            torch.log_softmax(z_.masked_fill(~mask, -math.inf), 1),
            torch.log_softmax(a_.masked_fill(~mask, -math.inf), 1),
            mask,
        )

    assert torch.autograd.gradcheck(kl, (z, a))
    assert torch.autograd.gradcheck(kl, (z, a_far.requires_grad_(True)))
    for b in range(3):  # values against the float64 loop, padding excluded
        lp = torch.log_softmax(z[b][mask[b]], 0)
        la = torch.log_softmax(a_far[b][mask[b]], 0)
        assert float(kl(z, a_far)[b]) == pytest.approx(_kl(lp.exp().tolist(), la.tolist()), rel=1e-12)

    # log-probs handed in directly, -inf at the padding: value and gradient are 0 there, never NaN
    lp = torch.log_softmax(z.detach().masked_fill(~mask, -math.inf), 1).requires_grad_(True)
    la = torch.log_softmax(a_far.detach().masked_fill(~mask, -math.inf), 1).requires_grad_(True)
    exact_group_kl(lp, la, mask).sum().backward()
    for t in (lp.grad, la.grad):
        assert torch.isfinite(t).all() and (t[~mask] == 0).all()
    assert torch.allclose(la.grad[mask], -lp.detach().exp()[mask], rtol=0, atol=1e-15)  # d/dlog anchor = -pi


# ---------------------------------------------------------------------------
# adaptive KL: the coefficient never reaches 0 or below
# ---------------------------------------------------------------------------
def test_adaptive_kl_refuses_a_horizon_that_could_flip_the_coefficient():
    # 32 groups a step at horizon 4: factor 1 - 0.2 * 32 / 4 = -0.6 on a low KL.
    with pytest.raises(ValueError, match=r"^grpo\.kl_horizon must be > grpo\.batch_size / 5 = 6\.4 .*got 4$"):
        GRPOConfig(kl_target=0.01, kl_horizon=4, batch_size=32)
    with pytest.raises(ConfigError, match=r"grpo\.kl_horizon must be > grpo\.batch_size / 5 = 6") as e:
        load_config(None, ["grpo.kl_target=0.01", "grpo.kl_horizon=6"])  # 32 / 6 > 5
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match="kl_horizon"):
        GRPOConfig(kl_target=0.01, kl_horizon=6, batch_size=30)  # ratio exactly 5: a factor of 0, stuck at 0
    GRPOConfig(kl_target=0.01, kl_horizon=7, batch_size=32)  # ratio 4.57 < 5: allowed
    GRPOConfig(kl_horizon=4, batch_size=32)  # no kl_target: the horizon is unused

    # The lowest factor a valid config can see is 1 - 0.2 * batch / horizon > 0; the controller refuses the rest.
    for horizon in (1, 3, 7):
        ctl = AdaptiveKLController(0.1, target=0.05, horizon=horizon)
        n = 5 * horizon - 1
        for _ in range(50):
            ctl.update(0.0, n)  # the KL far below target: the error clipped at -0.2, every step
        assert 0 < ctl.value == pytest.approx(0.1 * (1 - 0.2 * n / horizon) ** 50, rel=1e-9)
        with pytest.raises(ValueError, match=r"needs horizon > "):
            ctl.update(0.0, 5 * horizon)


# ---------------------------------------------------------------------------
# entropy bonus: groups weigh equally
# ---------------------------------------------------------------------------
def test_entropy_bonus_weighs_ragged_groups_equally():
    """Uniform groups of 4 and 1 candidates: H = (log 4, 0). The kit takes the mean over groups, log(4) / 2 = 0.693;
    verl and TRL average over candidates (tokens), (4 log 4 + 0) / 5 = 1.109."""
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    logits = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    logp = torch.log_softmax(logits.masked_fill(~mask, -math.inf), 1)
    group_equal = math.fsum([-4 * 0.25 * math.log(0.25), -1.0 * math.log(1.0)]) / 2
    candidate_equal = math.fsum([4 * math.log(4), 1 * 0.0]) / 5
    assert group_equal == pytest.approx(0.693147, abs=5e-7) and candidate_equal == pytest.approx(1.109035, abs=5e-7)
    assert float(group_entropy(logp, mask)) == pytest.approx(group_equal, rel=1e-12)

    zeros = torch.zeros(2, 4, dtype=F64)
    adv = group_advantages(zeros, mask)
    base, stats = grpo_loss(logp, logp.detach(), adv, mask=mask, kl_beta=0.0)
    bonus, _ = grpo_loss(logp, logp.detach(), adv, mask=mask, kl_beta=0.0, entropy_coef=0.1)
    assert float(base - bonus) == pytest.approx(0.1 * group_equal, rel=1e-12)
    assert stats["entropy"] == pytest.approx(group_equal, rel=1e-12)
    bonus.backward()
    assert torch.isfinite(logits.grad).all()
