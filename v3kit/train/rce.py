"""Stage 2: RCE warm-up (reward-weighted cross-entropy) with a linearly annealed temperature.

Loss per group: ``-sum_c t[c] log pi(c | q)`` with ``t = label_weight * onehot(label) + (1 - label_weight) *
softmax(rewards / T)``. ``T`` goes linearly from ``t_start`` (2.0, soft targets close to "every beam counts") to
``t_end`` (0.5, targets concentrated on the best-reward beams) over all RCE steps.

The seed does not say what ``T`` divides. ``temperature_target="rewards"`` (default) sharpens the targets and
leaves the policy's logit scale alone; ``"logits"`` anneals the policy's own temperature instead (targets use the
fixed ``reward_temperature``), which changes the log-prob scale GRPO's ratio later sees (suspect 5 in ``docs/pipeline.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..bounds import check_temperature
from ..data.contract import Batch, Splits
from .checkpoint import model_payload
from .losses import REWARD_NORMS, rce_cross_entropy
from .model import ModelConfig, disable_dropout, model_inputs, policy_log_probs
from .training import OptimConfig, RunContext, Stage, StageResult, StepContext, fit

TEMPERATURE_TARGETS = ("rewards", "logits")


@dataclass
class RCEConfig(OptimConfig):
    epochs: int = 3
    """RCE epochs; 0 skips RCE (the seed ran 3); at most 10,000."""
    lr: float = 1e-5
    """Adam learning rate (the seed: 1e-5)."""
    t_start: float = 2.0
    """Annealed temperature at the first RCE step (soft targets: every beam counts). Every temperature lies in
    [1e-6, 1e6]."""
    t_end: float = 0.5
    """Annealed temperature at the last RCE step (targets concentrated on the best beams)."""
    temperature_target: str = "rewards"
    """What the annealed temperature divides: ``rewards`` (sharpens the targets) | ``logits`` (the policy's own
    temperature; GRPO must then read log-probs at the temperature RCE ended at)."""
    reward_temperature: float = 1.0
    """Target temperature when ``temperature_target`` is ``logits``."""
    label_weight: float = 0.0
    """Mix of the human label into the targets."""
    reward_norm: str = "none"
    """Per-group reward normalisation applied before the temperature softmax of the targets: ``none`` (the seed:
    raw rewards, so how sharp the targets are depends on the reward's scale), ``zscore`` (units of the group's
    reward std: t_start/t_end then mean the same on any reward scale), ``rank`` (only the reward's order counts)."""

    section = "rce"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature_target not in TEMPERATURE_TARGETS:
            raise ValueError(
                f"rce.temperature_target must be one of {TEMPERATURE_TARGETS}, got {self.temperature_target!r}"
            )
        if not (self.t_start > 0 and self.t_end > 0 and self.reward_temperature > 0):
            raise ValueError("rce.t_start, rce.t_end and rce.reward_temperature must be > 0")
        for name in ("t_start", "t_end", "reward_temperature"):
            check_temperature(f"rce.{name}", getattr(self, name))
        if not 0.0 <= self.label_weight <= 1.0:
            raise ValueError(f"rce.label_weight must be in [0, 1], got {self.label_weight}")
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"rce.reward_norm must be one of {REWARD_NORMS}, got {self.reward_norm!r}")

    def temperatures(self, annealed: float, sim_temperature: float) -> tuple[float, float]:
        """(reward temperature, logit temperature) of the targets and the policy at annealed temperature
        ``annealed``: the one home of the rule. The annealed T divides the rewards (``temperature_target:
        rewards``: the policy keeps ``sim_temperature``) or the logits (``logits``: the targets keep the fixed
        ``reward_temperature``); docs/pipeline.md."""
        if self.temperature_target == "rewards":
            return annealed, sim_temperature
        return self.reward_temperature, sim_temperature * annealed


def rce_config_from(raw: dict[str, Any] | None) -> RCEConfig:
    """The :class:`RCEConfig` of a run's ``config.yaml`` section (keys this version does not know are ignored, a
    missing key takes its default), for readers of finished runs such as the doctor."""
    known = {f.name for f in fields(RCEConfig)}
    return RCEConfig(**{k: v for k, v in (raw or {}).items() if k in known})


def annealed_temperature(step: int, total_steps: int, t_start: float, t_end: float) -> float:
    """Linear schedule over steps ``0 .. total_steps - 1``: ``t_start`` at the first step, ``t_end`` at the last.

    A one-step schedule uses ``t_end`` (the temperature the stage is meant to finish at).
    """
    if total_steps <= 1:
        return t_end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return t_start + (t_end - t_start) * frac


def final_logit_temperature(cfg: RCEConfig, sim_temperature: float) -> float:
    """The logit temperature the policy ends RCE at (what ``grpo.logp_temperature="same_as_rce_end"`` uses)."""
    return cfg.temperatures(cfg.t_end, sim_temperature)[1] if cfg.epochs > 0 else sim_temperature


class RCEStage(Stage):
    """Reward-weighted cross-entropy towards ``softmax(rewards / T)`` with ``T`` annealed linearly per step."""

    name = "rce"
    extendable = ()  # the temperature schedule spans all RCE steps: more epochs would change the past ones

    def __init__(
        self,
        policy: nn.Module,
        splits: Splits,
        cfg: RCEConfig,
        model_config: ModelConfig,
        *,
        reference: nn.Module | None = None,
    ) -> None:
        meta = {"config": asdict(cfg), **model_payload(model_config, splits.train.query_dim, splits.train.cand_dim)}
        if model_config.disable_dropout:
            disable_dropout(policy)
        super().__init__(
            policy,
            splits.train,
            splits.val,
            cfg,
            reference=reference,
            temperature=model_config.sim_temperature,
            meta=meta,
        )
        self.annealed: float | None = None  # T of the latest step; None until the first RCE step

    def step(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, sim_t = self.cfg, self.temperature
        self.annealed = annealed_temperature(ctx.step, ctx.total_steps, cfg.t_start, cfg.t_end)
        reward_t, logit_t = cfg.temperatures(self.annealed, sim_t)
        logp = policy_log_probs(self.model, *model_inputs(self.model, batch), batch.mask, logit_t)
        loss = rce_cross_entropy(
            logp, batch.labels, batch.rewards, reward_t, label_weight=cfg.label_weight, reward_norm=cfg.reward_norm
        )
        return loss, {"temperature": self.annealed}

    def eval_temperature(self) -> float:
        # The policy is read at the logit temperature it was last trained at: SFT's before the first RCE step
        # (so epoch 0 is the SFT baseline), the annealed one after, when RCE anneals the logits.
        if self.annealed is None:
            return self.temperature
        return self.cfg.temperatures(self.annealed, self.temperature)[1]


def run_rce(
    policy: nn.Module,
    splits: Splits,
    cfg: RCEConfig | None = None,
    *,
    model_config: ModelConfig | None = None,
    reference: nn.Module | None = None,
    **run: Any,
) -> StageResult:
    """Stage 2: train ``policy`` in place with RCE; saves ``rce_epoch{N}.pt`` per epoch in ``run_dir``.

    ``run``: the fields of a :class:`v3kit.train.training.RunContext` (seed, run_dir, resume, callbacks, progress,
    device, precision, log_every); the policy moves to ``device``.
    """
    stage = RCEStage(policy, splits, cfg or RCEConfig(), model_config or ModelConfig(), reference=reference)
    return fit(stage, RunContext(**run))
