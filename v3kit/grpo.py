"""Stage 3: GRPO on groups of candidates, with every suspected cause of underperformance as a switch.

Seed form (the defaults): every beam candidate is a sample with equal weight, advantages are rewards normalised
within the group, the PPO ratio is taken against ``old_log_probs`` computed once from SFT in stage 1, and the KL
penalty is ``ratio - 1 - log ratio`` against that same old policy.

Switches (DESIGN.md "Why GRPO might underperform"):

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from torch import Tensor, nn

from .checkpoint import model_payload
from .data import Batch, Splits
from .losses import group_advantages, grpo_loss, zero_std_groups
from .model import ModelConfig, compute_log_probs, model_inputs, policy_log_probs
from .training import StageResult, StepContext, check_optim_fields, fit

OLD_POLICIES = ("sft", "refresh_at_start", "refresh_each_epoch")
KL_REFERENCES = ("old", "sft")
KL_ESTIMATORS = (None, "seed", "k1", "k2", "k3")
ADV_SCALES = ("group", "batch", "none")
SAMPLE_MODES = ("all", "sampled", "exact")


@dataclass
class GRPOConfig:
    epochs: int = 8
    lr: float = 1e-5
    batch_size: int = 32
    kl_beta: float = 0.1
    eps_low: float = 0.2
    eps_high: float | None = None  # None = eps_low (symmetric clip)
    dual_clip: float | None = None
    old_policy: str = "sft"
    kl_reference: str = "old"
    kl_estimator: str | None = None
    adv_scale: str = "group"
    adv_eps: float = 1e-4
    baseline: float = 0.0
    drop_zero_std_groups: bool = False
    samples: str = "all"
    num_samples: int = 8
    logp_temperature: Union[str, float] = "same_as_rce_end"
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        for name, allowed in (("old_policy", OLD_POLICIES), ("kl_reference", KL_REFERENCES),
                              ("kl_estimator", KL_ESTIMATORS), ("adv_scale", ADV_SCALES), ("samples", SAMPLE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"grpo.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_optim_fields("grpo", self.epochs, self.lr, self.batch_size, self.max_grad_norm)
        if self.kl_beta < 0:
            raise ValueError(f"grpo.kl_beta must be >= 0, got {self.kl_beta}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"grpo.eps_low must be in [0, 1) (the lower clip bound is 1 - eps_low), got {self.eps_low}")
        if self.eps_high is not None and self.eps_high < 0:
            raise ValueError(f"grpo.eps_high must be >= 0 or null (= eps_low), got {self.eps_high}")
        if self.adv_eps < 0:
            raise ValueError(f"grpo.adv_eps must be >= 0 (it is added to the std), got {self.adv_eps}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"grpo.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.num_samples < 2:
            raise ValueError(f"grpo.num_samples must be >= 2 (a group of one has no relative advantage), "
                             f"got {self.num_samples}")
        lt = self.logp_temperature
        if isinstance(lt, str):
            if lt != "same_as_rce_end":
                raise ValueError(f"grpo.logp_temperature must be 'same_as_rce_end' or a number > 0, got {lt!r}")
        elif not lt > 0:
            raise ValueError(f"grpo.logp_temperature must be > 0, got {lt}")

    def resolve_temperature(self, rce_end_temperature: float) -> float:
        return rce_end_temperature if self.logp_temperature == "same_as_rce_end" else float(self.logp_temperature)


def _masked_std(x: Tensor, mask: Tensor) -> float:
    v = x[mask]
    return float(v.std()) if v.numel() > 1 else 0.0


def grpo_step_loss(
    logp: Tensor,
    old_logp: Tensor,
    rewards: Tensor,
    mask: Tensor,
    cfg: GRPOConfig,
    *,
    ref_logp: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective of one batch of groups under ``cfg``'s switches (logp, old, ref: [B, G] full groups)."""
    stats: dict[str, float] = {}
    if cfg.samples == "sampled":
        # On-policy GRPO: K candidates drawn from the old policy form the group; advantages are relative to them.
        probs = torch.where(mask, old_logp.exp(), torch.zeros_like(old_logp))
        idx = torch.multinomial(probs, cfg.num_samples, replacement=True, generator=generator)
        entropy = -torch.where(mask, logp.exp() * logp, torch.zeros_like(logp)).sum(1).mean().item()
        logp, old_logp, rewards = logp.gather(1, idx), old_logp.gather(1, idx), rewards.gather(1, idx)
        ref_logp = None if ref_logp is None else ref_logp.gather(1, idx)
        mask = torch.ones_like(idx, dtype=torch.bool)
        stats["entropy"] = entropy
    zero = zero_std_groups(rewards, mask)
    stats["frac_reward_zero_std"] = zero.float().mean().item()
    keep = ~zero if cfg.drop_zero_std_groups else torch.ones_like(zero)
    if not keep.any():  # nothing in this batch carries signal: no update (the runner skips the step)
        return logp.new_zeros(()), {**stats, "pg_loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "adv_std": 0.0}
    if not keep.all():
        logp, old_logp, rewards, mask = logp[keep], old_logp[keep], rewards[keep], mask[keep]
        ref_logp = None if ref_logp is None else ref_logp[keep]
    adv = group_advantages(rewards, mask, scale=cfg.adv_scale, eps=cfg.adv_eps, baseline=cfg.baseline)
    weights = torch.where(mask, old_logp.exp(), torch.zeros_like(old_logp)) if cfg.samples == "exact" else None
    loss, loss_stats = grpo_loss(
        logp, old_logp, adv, mask=mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high, kl_beta=cfg.kl_beta,
        ref_logp=ref_logp, kl_estimator=cfg.kl_estimator, weights=weights, dual_clip=cfg.dual_clip,
    )
    loss_stats.update(stats)  # the full-group entropy wins over the entropy of the sampled sub-group
    loss_stats["adv_std"] = _masked_std(adv, mask)
    return loss, loss_stats


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


def run_grpo(
    policy: nn.Module,
    splits: Splits,
    old_log_probs: Tensor,
    cfg: GRPOConfig | None = None,
    *,
    reference: nn.Module | None = None,
    temperature: float | None = None,
    model_config: ModelConfig | None = None,
    seed: int = 0,
    run_dir: str | Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> StageResult:
    """Stage 3: train ``policy`` in place with GRPO; saves ``grpo_epoch{N}.pt`` per epoch in ``run_dir``.

    ``old_log_probs`` are stage 1's ([N_train, G]); ``temperature`` is GRPO's logit temperature (default: the
    model's ``sim_temperature``, i.e. what ``same_as_rce_end`` resolves to after a rewards-tempered RCE).
    ``result.info["step0_ratios"]`` holds every valid ratio on the training set before the first update.
    """
    cfg = cfg or GRPOConfig()
    model_config = model_config or ModelConfig()
    train = splits.train
    if tuple(old_log_probs.shape) != tuple(train.mask.shape):
        raise ValueError(f"old_log_probs has shape {tuple(old_log_probs.shape)} but the training split is "
                         f"{tuple(train.mask.shape)}; compute them on this split with load_sft(...)")
    if cfg.kl_reference == "sft" and reference is None:
        raise ValueError("grpo.kl_reference='sft' needs the frozen SFT model: pass reference=stage1.reference")
    temperature = model_config.sim_temperature if temperature is None else temperature
    state = {"old": old_log_probs.clone()}

    def refresh() -> None:
        state["old"] = compute_log_probs(policy, train, temperature)

    current = compute_log_probs(policy, train, temperature)
    if cfg.old_policy != "sft":  # both refresh modes start from the policy GRPO starts with
        state["old"] = current
    step0 = torch.exp((current - state["old"])[train.mask].clamp(-20, 20))
    step0_summary = ratio_stats(step0, cfg.eps_low, cfg.eps_high)

    def on_epoch_start(epoch: int) -> None:
        if cfg.old_policy == "refresh_each_epoch" and epoch > 1:  # epoch 1 was refreshed above
            refresh()

    def step_fn(batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        logp = policy_log_probs(policy, *model_inputs(policy, batch), batch.mask, temperature)
        ref_logp = None
        if cfg.kl_reference == "sft":
            with torch.no_grad():
                ref_logp = policy_log_probs(reference, *model_inputs(reference, batch), batch.mask, temperature)
        loss, stats = grpo_step_loss(logp, state["old"][batch.index], batch.rewards, batch.mask, cfg,
                                     ref_logp=ref_logp, generator=ctx.generator)
        stats["temperature"] = temperature
        return loss, stats

    meta = {"config": asdict(cfg), "temperature": temperature,
            **model_payload(model_config, train.query_dim, train.cand_dim)}
    result = fit(
        stage="grpo", model=policy, train=train, val=splits.val, step_fn=step_fn, epochs=cfg.epochs, lr=cfg.lr,
        batch_size=cfg.batch_size, seed=seed, eval_temperature=temperature, reference=reference,
        max_grad_norm=cfg.max_grad_norm, run_dir=run_dir, resume=resume, callbacks=callbacks, progress=progress,
        checkpoint_meta=meta, on_epoch_start=on_epoch_start,
        extra_state=lambda: {"old_log_probs": state["old"]},
        restore_extra=lambda extra: state.update(old=extra["old_log_probs"]),
        eval_extra=lambda epoch: step0_summary if epoch == 0 else {},
    )
    result.info.update(step0_ratios=step0, temperature=temperature, **step0_summary)
    return result
