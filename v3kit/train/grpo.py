"""Stage 3: GRPO on groups of candidates, with every suspected cause of underperformance as a switch.

Seed form (the defaults): every beam candidate is a sample with equal weight, advantages are rewards normalised
within the group, the PPO ratio is taken against ``old_log_probs`` computed once from SFT in stage 1, and the KL
penalty is ``ratio - 1 - log ratio`` against that same old policy.

Switches (the suspects of ``docs/pipeline.md``, "Why GRPO might underperform"):

* ``old_policy``: ``"sft"`` (seed: stage-1 log-probs, stale after RCE) | ``"refresh_at_start"`` (recompute from
  the policy GRPO starts from, as PPO does per rollout) | ``"refresh_each_epoch"`` (PPO's per-iteration refresh).
* ``kl_reference``: ``"old"`` (seed) | ``"sft"`` (the frozen SFT copy, as in DeepSeekMath's GRPO);
  ``kl_estimator``: ``"seed"`` | ``"k1"`` | ``"k2"`` | ``"k3"`` (Schulman, "Approximating KL divergence");
  ``None`` picks ``"seed"`` against old and ``"k3"`` against sft. The SFT reference is read at GRPO's logit
  temperature, so the penalty compares the two policies at one temperature (as ``kl_to_sft`` does).
* ``adv_scale``: ``"group"`` (GRPO) | ``"batch"`` (TRL ``scale_rewards="batch"``) | ``"none"`` (Dr. GRPO);
  ``baseline`` (the seed's extra ``- baseline``); ``drop_zero_std_groups`` (DAPO's dynamic sampling, here: leave
  groups without reward spread out of the loss instead of diluting it).
* ``samples``: ``"all"`` (seed: every candidate, equal weight) | ``"sampled"`` (``num_samples`` draws per group from
  the old policy, advantages normalised within the draws: on-policy GRPO) | ``"exact"`` (every candidate weighted by
  its old-policy probability: the exact expectation of the sampled surrogate, no sampling noise).
* ``eps_low`` / ``eps_high`` (DAPO clip-higher) and ``dual_clip`` (Ye et al. 2020).
* ``logp_temperature``: ``"same_as_rce_end"`` or a number: the logit temperature of GRPO's log-probs.

Remedies (off by default, so the seed's numbers do not change):

* ``entropy_coef``: entropy bonus ``- entropy_coef * mean_b H(pi_b)`` over full groups (against entropy collapse).
* ``kl_target`` / ``kl_horizon``: adaptive KL coefficient (verl's ``AdaptiveKLController``): ``kl_beta`` is the
  starting value and is rescaled after every step towards a penalty KL of ``kl_target``; logged as ``kl_beta``.
* ``kl_estimator="exact"``: the whole-group ``KL(pi || anchor) = sum_c pi log(pi / anchor)``, exact for a ranker
  that scores every candidate (no single-sample estimator); with ``samples="sampled"`` it is taken on the full
  groups, like the entropy bonus.
* ``loss_type="cispo"``: clipped, detached importance weight times the log-prob (CISPO), so clipped candidates keep
  a gradient; ``adv_scale="rloo"``: leave-one-out baseline (each candidate against the mean of the others).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from ..bounds import check_max, check_temperature
from ..data.contract import Batch, Splits
from .checkpoint import model_payload
from .losses import (
    ADV_SCALES,
    EXACT_KL,
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    LOSS_TYPES,
    AdaptiveKLController,
    group_advantages,
    grpo_loss_terms,
    std_over,
    zero_std_groups,
)
from .model import ModelConfig, compute_log_probs, disable_dropout, model_inputs, policy_log_probs
from .training import OptimConfig, RunContext, Stage, StageResult, StepContext, fit

OLD_POLICIES = ("sft", "refresh_at_start", "refresh_each_epoch")
KL_REFERENCES = ("old", "sft")
KL_ESTIMATOR_CHOICES = (None, *KL_ESTIMATORS, EXACT_KL)  # None: "seed" against old, "k3" against sft
SAMPLE_MODES = ("all", "sampled", "exact")
MAX_KL_HORIZON = 10**12


@dataclass
class GRPOConfig(OptimConfig):
    epochs: int = 8
    """GRPO epochs (the seed ran 8); at most 10,000."""
    lr: float = 1e-5
    """Adam learning rate (the seed: 1e-5)."""
    kl_beta: float = 0.1
    """Weight of the KL penalty (the seed: 0.1)."""
    eps_low: float = 0.2
    """Lower clip bound ``1 - eps_low`` of the PPO ratio."""
    eps_high: float | None = None
    """Upper clip bound ``1 + eps_high``; > eps_low is DAPO's clip-higher; null = eps_low (symmetric)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1: bounds the loss of negative-advantage entries at ``-c * A`` (Ye et al. 2020); null =
    off."""
    old_policy: str = "sft"
    """The ratio's old policy: ``sft`` (stage-1 log-probs, stale after RCE: the seed) | ``refresh_at_start`` |
    ``refresh_each_epoch`` (PPO)."""
    kl_reference: str = "old"
    """What the KL penalty anchors to: the ``old`` policy (the seed) or the frozen ``sft`` copy
    (DeepSeekMath's GRPO)."""
    kl_estimator: str | None = None
    """``seed`` (ratio - 1 - log ratio) | ``k1`` | ``k2`` | ``k3`` (Schulman's estimators) | ``exact`` (the whole-group
    sum ``sum_c pi log(pi / anchor)``; with ``samples: sampled`` taken on the full groups, not the draws); null = seed
    against old, k3 against sft."""
    adv_scale: str = "group"
    """Advantage scale: ``group`` std (GRPO) | ``batch`` std (TRL's scale_rewards=batch) | ``none`` (Dr. GRPO)."""
    adv_eps: float = 1e-4
    """Added to the std before dividing the advantages."""
    baseline: float = 0.0
    """The seed's extra ``- baseline`` after normalising the advantages (0 = none)."""
    drop_zero_std_groups: bool = False
    """Leave groups without reward spread out of the loss instead of diluting it (DAPO's dynamic sampling)."""
    samples: str = "all"
    """Which candidates are GRPO's samples: ``all`` (every beam, equal weight: the seed) | ``sampled`` (``num_samples``
    draws from the old policy) | ``exact`` (every candidate weighted by its old-policy probability)."""
    num_samples: int = 8
    """Draws per group when ``samples: sampled``; at most 100,000 (draws cost memory per group, a group holds far
    fewer candidates)."""
    logp_temperature: Union[str, float] = "same_as_rce_end"
    """Logit temperature of GRPO's log-probs: ``same_as_rce_end`` or a number."""
    entropy_coef: float = 0.0
    """Entropy bonus: subtract ``entropy_coef`` x the mean group entropy of the policy from the loss (0 = off, the
    seed; verl's and TRL's entropy coefficient). Every group weighs the same in that mean; verl and TRL weigh every
    token (here: candidate), so on ragged groups their bonus leans towards the larger groups."""
    kl_target: float | None = None
    """Adaptive KL (verl's AdaptiveKLController): null = fixed ``kl_beta`` (the seed); a number = the penalty KL to
    aim at: ``kl_beta`` starts at its configured value and is rescaled each step by
    ``1 + clip(kl / kl_target - 1, +-0.2) * groups_in_batch / kl_horizon`` (logged as ``kl_beta``)."""
    kl_horizon: int = 10000
    """Horizon (in groups) of the adaptive KL controller: how fast ``kl_beta`` adapts. With ``kl_target`` set it
    must exceed ``batch_size / 5``, or a step could scale ``kl_beta`` by a factor <= 0; at most 10^12."""
    kl_beta_min: float = 1e-8
    """Floor of the adaptive ``kl_beta`` (with ``kl_target``): repeated shrinking would otherwise underflow it to
    exactly 0, where a multiplicative controller stays for good. Must be in [0, ``kl_beta``]; 1e-8 weighs the KL
    penalty at nothing while keeping a coefficient the controller can raise again."""
    loss_type: str = "ppo"
    """``ppo`` (the seed: PPO's clipped surrogate) | ``cispo`` (clipped, detached importance weight x log-prob, so
    clipped candidates keep a gradient)."""

    section = "grpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (
            ("old_policy", OLD_POLICIES),
            ("kl_reference", KL_REFERENCES),
            ("kl_estimator", KL_ESTIMATOR_CHOICES),
            ("adv_scale", ADV_SCALES),
            ("samples", SAMPLE_MODES),
            ("loss_type", LOSS_TYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"grpo.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.kl_beta < 0:
            raise ValueError(f"grpo.kl_beta must be >= 0, got {self.kl_beta}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(
                f"grpo.eps_low must be in [0, 1) (the lower clip bound is 1 - eps_low), got {self.eps_low}"
            )
        if self.eps_high is not None and self.eps_high < 0:
            raise ValueError(f"grpo.eps_high must be >= 0 or null (= eps_low), got {self.eps_high}")
        if self.adv_eps < 0:
            raise ValueError(f"grpo.adv_eps must be >= 0 (it is added to the std), got {self.adv_eps}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"grpo.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.num_samples < 2:
            raise ValueError(
                f"grpo.num_samples must be >= 2 (a group of one has no relative advantage), got {self.num_samples}"
            )
        check_max("grpo.num_samples", self.num_samples, 100_000, "draws cost memory per group; is it a typo?")
        if self.entropy_coef < 0:
            raise ValueError(f"grpo.entropy_coef must be >= 0 (a bonus on entropy), got {self.entropy_coef}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"grpo.kl_target must be > 0 or null (fixed kl_beta), got {self.kl_target}")
        if self.kl_horizon < 1:
            raise ValueError(f"grpo.kl_horizon must be >= 1, got {self.kl_horizon}")
        check_max("grpo.kl_horizon", self.kl_horizon, MAX_KL_HORIZON, "a horizon past any run's groups freezes kl_beta")
        if self.kl_target is not None and 5 * self.kl_horizon <= self.batch_size:
            # a step multiplies kl_beta by 1 + clip(err, +-0.2) * batch_size / kl_horizon: 0 or negative at ratio >= 5
            raise ValueError(
                f"grpo.kl_horizon must be > grpo.batch_size / 5 = {self.batch_size / 5:g} with "
                f"grpo.kl_target set (else kl_beta can turn <= 0), got {self.kl_horizon}"
            )
        if self.kl_target is not None and self.kl_beta == 0:
            raise ValueError("grpo.kl_target needs grpo.kl_beta > 0 to start from (an adaptive 0 stays 0)")
        if self.kl_target is not None and not 0 <= self.kl_beta_min <= self.kl_beta:
            raise ValueError(
                f"grpo.kl_beta_min must be in [0, grpo.kl_beta = {self.kl_beta:g}] (the adaptive kl_beta's floor), "
                f"got {self.kl_beta_min:g}"
            )
        lt = self.logp_temperature
        if isinstance(lt, str):
            if lt != "same_as_rce_end":
                raise ValueError(f"grpo.logp_temperature must be 'same_as_rce_end' or a number > 0, got {lt!r}")
        elif not lt > 0:
            raise ValueError(f"grpo.logp_temperature must be > 0, got {lt}")
        else:
            check_temperature("grpo.logp_temperature", lt)

    def resolve_temperature(self, rce_end_temperature: float) -> float:
        return rce_end_temperature if self.logp_temperature == "same_as_rce_end" else float(self.logp_temperature)


def grpo_step_loss(
    logp: Tensor,
    old_logp: Tensor,
    rewards: Tensor,
    mask: Tensor,
    cfg: GRPOConfig,
    *,
    ref_logp: Tensor | None = None,
    generator: torch.Generator | None = None,
    group_terms: tuple[Tensor, Tensor] | None = None,
    kl_beta: float | None = None,
) -> tuple[Tensor, dict[str, float | Tensor]]:
    """The GRPO objective of one batch of groups under ``cfg``'s switches (logp, old, ref: [B, G] full groups).

    ``group_terms``: ``(no_signal [B], advantages [B, G])`` of these groups when the caller has them (see
    :func:`per_group_terms`); only valid for switches under which a group's advantages depend on that group alone.
    The statistics are 0-d tensors on the batch's device (the runner reads them back in batches). ``generator``
    is a CPU generator: on another device the sampling probabilities are copied to the CPU to draw, so a run
    draws the same candidates on every device and CPU runs keep their numbers. ``kl_beta``: the KL
    coefficient of this step, :class:`GRPOObjective`'s (None: ``cfg.kl_beta``, for a one-off call).
    """
    stats: dict[str, float | Tensor] = {}
    kl_beta = cfg.kl_beta if kl_beta is None else kl_beta
    full = None  # with samples="sampled": the full groups, whose entropy (and exact KL) the loss takes
    if cfg.samples == "sampled":
        full = (logp, old_logp if ref_logp is None else ref_logp, mask)
        logp, old_logp, rewards, ref_logp, mask = _draw(logp, old_logp, rewards, ref_logp, mask, cfg, generator)
    if group_terms is not None and not per_group_advantages(cfg):
        raise ValueError(
            f"group_terms cannot be precomputed for samples={cfg.samples!r}, "
            f"adv_scale={cfg.adv_scale!r}: advantages depend on the batch"
        )
    zero = zero_std_groups(rewards, mask) if group_terms is None else group_terms[0]
    stats["frac_reward_zero_std"] = zero.float().mean()
    # Only drop_zero_std_groups needs to know (on the host) which groups to keep; the default path never waits.
    keep = ~zero if cfg.drop_zero_std_groups else None
    if keep is not None and not keep.any():
        # Nothing in this batch carries signal: the loss is a mean over no group, taken as exactly 0 (no policy
        # term, no KL, no entropy bonus: a dropped group leaves every term), and the runner takes no step.
        return logp.new_zeros(()), {**stats, **NO_SIGNAL_STATS}
    if keep is not None and not keep.all():
        logp, old_logp, rewards, mask = logp[keep], old_logp[keep], rewards[keep], mask[keep]
        ref_logp = None if ref_logp is None else ref_logp[keep]
        full = None if full is None else tuple(t[keep] for t in full)
    if group_terms is not None:
        adv = group_terms[1] if keep is None else group_terms[1][keep]
    else:
        adv = group_advantages(
            rewards,
            mask,
            scale=cfg.adv_scale,
            eps=cfg.adv_eps,
            baseline=cfg.baseline,
            no_signal=zero if keep is None else zero[keep],
        )
    weights = torch.where(mask, old_logp.exp(), torch.zeros_like(old_logp)) if cfg.samples == "exact" else None
    loss, loss_stats = grpo_loss_terms(
        logp,
        old_logp,
        adv,
        mask=mask,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        kl_beta=kl_beta,
        ref_logp=ref_logp,
        kl_estimator=cfg.kl_estimator,
        weights=weights,
        dual_clip=cfg.dual_clip,
        loss_type=cfg.loss_type,
        entropy_coef=cfg.entropy_coef,
        full_groups=full,  # samples="sampled": the entropy bonus and an exact KL are the full groups'
    )
    loss_stats.update(stats)
    with torch.no_grad():
        loss_stats["adv_std"] = std_over(adv, mask)
    return loss, loss_stats


# The statistics of a batch in which no group carries signal (drop_zero_std_groups dropped them all).
NO_SIGNAL_STATS = {
    "pg_loss": 0.0,
    "kl": 0.0,
    "clip_ratio": 0.0,
    "clip_ratio/low_mean": 0.0,
    "clip_ratio/high_mean": 0.0,
    "adv_std": 0.0,
}


def _draw(
    logp: Tensor,
    old_logp: Tensor,
    rewards: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    cfg: GRPOConfig,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """``samples="sampled"``, on-policy GRPO: ``num_samples`` candidates drawn from the old policy form each group
    (advantages are relative to them); the CPU draws, so every device gets the same candidates."""
    probs = torch.where(mask, old_logp.exp(), torch.zeros_like(old_logp))
    idx = torch.multinomial(probs.cpu(), cfg.num_samples, replacement=True, generator=generator).to(probs.device)
    logp, old_logp, rewards = logp.gather(1, idx), old_logp.gather(1, idx), rewards.gather(1, idx)
    ref_logp = None if ref_logp is None else ref_logp.gather(1, idx)
    return logp, old_logp, rewards, ref_logp, torch.ones_like(idx, dtype=torch.bool)


class GRPOObjective:
    """The GRPO objective of a run: ``cfg``'s switches (:func:`grpo_step_loss`; :func:`grpo_loss_terms` assembles
    the policy, KL and entropy terms) and its state, the KL coefficient. That coefficient is ``cfg.kl_beta``, or with ``cfg.kl_target`` the
    adaptive controller's current value, updated after every step (logged as ``kl_beta``): the one source of the
    ``kl_beta`` a step uses."""

    def __init__(self, cfg: GRPOConfig) -> None:
        self.cfg = cfg
        self.adaptive = cfg.kl_target is not None
        self.kl = (
            AdaptiveKLController(cfg.kl_beta, cfg.kl_target, cfg.kl_horizon, cfg.kl_beta_min) if self.adaptive else None
        )

    @property
    def kl_beta(self) -> float:
        return self.kl.value if self.kl is not None else self.cfg.kl_beta

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        rewards: Tensor,
        mask: Tensor,
        *,
        ref_logp: Tensor | None = None,
        generator: torch.Generator | None = None,
        group_terms: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float | Tensor]]:
        beta = self.kl_beta
        loss, stats = grpo_step_loss(
            logp,
            old_logp,
            rewards,
            mask,
            self.cfg,
            ref_logp=ref_logp,
            generator=generator,
            group_terms=group_terms,
            kl_beta=beta,
        )
        if self.kl is not None:  # the coefficient this step used; the update applies from the next step on
            stats["kl_beta"] = beta
            self.kl.update(float(stats["kl"]), len(rewards))  # a host read per step, only with kl_target
        return loss, stats

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective: the adapted coefficient (nothing for a fixed one)."""
        return {"kl_beta": self.kl.value} if self.kl is not None else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.kl is not None and "kl_beta" in state:
            self.kl.value = float(state["kl_beta"])


def per_group_advantages(cfg: GRPOConfig) -> bool:
    """Whether a group's advantages depend on that group alone (not with ``samples="sampled"``, whose groups are
    the draws, nor with ``adv_scale="batch"``, whose scale is the batch's)."""
    return cfg.samples != "sampled" and cfg.adv_scale != "batch"


def per_group_terms(rewards: Tensor, mask: Tensor, cfg: GRPOConfig) -> tuple[Tensor, Tensor]:
    """``(no_signal, advantages)`` of every group at once: rewards never change during GRPO, so the runner reads
    a batch's rows instead of recomputing them each step (row for row the same numbers)."""
    zero = zero_std_groups(rewards, mask)
    return zero, group_advantages(
        rewards, mask, scale=cfg.adv_scale, eps=cfg.adv_eps, baseline=cfg.baseline, no_signal=zero
    )


def ratio_stats(ratios: Tensor, eps_low: float, eps_high: float | None) -> dict[str, float]:
    """Summary of a set of PPO ratios: where GRPO starts from, and how much of it the clip range excludes."""
    eps_high = eps_low if eps_high is None else eps_high
    return {
        "step0_ratio_mean": float(ratios.mean()),
        "step0_ratio_std": float(ratios.std()) if ratios.numel() > 1 else 0.0,
        "step0_ratio_min": float(ratios.min()),
        "step0_ratio_max": float(ratios.max()),
        "step0_outside_clip": float(((ratios < 1 - eps_low) | (ratios > 1 + eps_high)).float().mean()),
    }


class GRPOStage(Stage):
    """GRPO on groups of candidates (the module docstring lists the switches). Everything that never changes
    during GRPO is computed once here: the old policy's log-probs (unless refreshed), the frozen reference's
    log-probs, the per-group advantages, and the step-0 ratio summary."""

    name = "grpo"

    def __init__(
        self,
        policy: nn.Module,
        splits: Splits,
        old_log_probs: Tensor,
        cfg: GRPOConfig,
        model_config: ModelConfig,
        *,
        reference: nn.Module | None,
        temperature: float,
        device: torch.device | str,
        precision: str,
    ) -> None:
        train = splits.train
        meta = {
            "config": asdict(cfg),
            "temperature": temperature,
            **model_payload(model_config, train.query_dim, train.cand_dim),
        }
        if model_config.disable_dropout:  # before any log-prob: old, current and reference computed alike
            disable_dropout(policy)
        super().__init__(policy, train, splits.val, cfg, reference=reference, temperature=temperature, meta=meta)
        self.device, self.precision = torch.device(device), precision
        policy.to(self.device)
        if reference is not None:
            reference.to(self.device)
        mask = train.mask.to(self.device)
        self.old = old_log_probs.to(self.device).clone()
        current = compute_log_probs(policy, train, temperature, precision=precision)
        if cfg.old_policy != "sft":  # both refresh modes start from the policy GRPO starts with
            self.old = current
        log_ratio = (current - self.old)[mask].clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        self.step0_ratios = torch.exp(log_ratio).cpu()  # every valid ratio before the first update
        self.step0_summary = ratio_stats(self.step0_ratios, cfg.eps_low, cfg.eps_high)
        # The frozen reference never changes: its log-probs are read once (on the train split, at GRPO's
        # temperature, like old_log_probs) and looked up by batch.index instead of a forward pass per step.
        self.ref = (
            None if cfg.kl_reference != "sft" else compute_log_probs(reference, train, temperature, precision=precision)
        )
        # Rewards never change either: when a group's advantages depend on that group alone, compute them once.
        self.terms = per_group_terms(train.rewards.to(self.device), mask, cfg) if per_group_advantages(cfg) else None
        self.objective = GRPOObjective(cfg)  # the loss and its adaptive KL coefficient (state saved with checkpoints)

    def on_epoch_start(self, epoch: int) -> None:
        if self.cfg.old_policy == "refresh_each_epoch" and epoch > 1:  # epoch 1 was refreshed in __init__
            self.old = compute_log_probs(self.model, self.train, self.temperature, precision=self.precision)

    def step(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        logp = policy_log_probs(self.model, *model_inputs(self.model, batch), batch.mask, self.temperature)
        ref_logp = None if self.ref is None else self.ref[batch.index]
        group_terms = None if self.terms is None else (self.terms[0][batch.index], self.terms[1][batch.index])
        loss, stats = self.objective(
            logp,
            self.old[batch.index],
            batch.rewards,
            batch.mask,
            ref_logp=ref_logp,
            generator=ctx.generator,
            group_terms=group_terms,
        )
        stats["temperature"] = self.temperature
        return loss, stats

    def extra_state(self) -> dict[str, Any]:
        # stored on the CPU by save_checkpoint
        return {"old_log_probs": self.old, **self.objective.state()}

    def restore_extra(self, extra: dict[str, Any]) -> None:
        self.old = extra["old_log_probs"].to(self.device)
        self.objective.load_state(extra)  # the adapted coefficient, not the starting one

    def eval_extra(self, epoch: int) -> dict[str, float]:
        return self.step0_summary if epoch == 0 else {}


def run_grpo(
    policy: nn.Module,
    splits: Splits,
    old_log_probs: Tensor,
    cfg: GRPOConfig | None = None,
    *,
    reference: nn.Module | None = None,
    temperature: float | None = None,
    model_config: ModelConfig | None = None,
    **run: Any,
) -> StageResult:
    """Stage 3: train ``policy`` in place with GRPO; saves ``grpo_epoch{N}.pt`` per epoch in ``run_dir``.

    ``old_log_probs`` are stage 1's ([N_train, G]); ``temperature`` is GRPO's logit temperature (default: the
    model's ``sim_temperature``, i.e. what ``same_as_rce_end`` resolves to after a rewards-tempered RCE).
    ``result.info["step0_ratios"]`` holds every valid ratio on the training set before the first update (CPU).
    ``run``: the fields of a :class:`v3kit.train.training.RunContext` (seed, run_dir, resume, callbacks, progress,
    device, precision, log_every); the policy, the reference and the old log-probs move to ``device``.
    """
    cfg = cfg or GRPOConfig()
    model_config = model_config or ModelConfig()
    train = splits.train
    if tuple(old_log_probs.shape) != tuple(train.mask.shape):
        raise ValueError(
            f"old_log_probs has shape {tuple(old_log_probs.shape)} but the training split is "
            f"{tuple(train.mask.shape)}; compute them on this split with load_sft(...)"
        )
    if cfg.kl_reference == "sft" and reference is None:
        raise ValueError("grpo.kl_reference='sft' needs the frozen SFT model: pass reference=stage1.reference")
    temperature = model_config.sim_temperature if temperature is None else temperature
    context = RunContext(**run)
    stage = GRPOStage(
        policy,
        splits,
        old_log_probs,
        cfg,
        model_config,
        reference=reference,
        temperature=temperature,
        device=context.device,
        precision=context.precision,
    )
    result = fit(stage, context)
    result.info.update(step0_ratios=stage.step0_ratios, temperature=temperature, **stage.step0_summary)
    return result
