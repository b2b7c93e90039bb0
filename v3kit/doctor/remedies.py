"""The variants ``v3kit investigate`` tests against a run: the references, the remedies meant to be shipped (each
keeping its best val epoch), and each of the doctor's switches alone; and the rule that picks the one to ship."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from ..config import RunConfig
from ..data.debias import DEBIAS_ESTIMATORS
from ..train.metrics import METRIC_DIRECTION
from .grid import switch_overrides, variant_name
from .verdict_report import SFT_ONLY

RUN = "run"  # the reference variant that is the run as it was


@dataclass
class Variant:
    name: str
    overrides: list[str]
    kind: str  # reference | single | remedy
    why: str  # one line: what it tests
    check: str | None = None  # the doctor check a single switch comes from


def moving_lr(cfg: RunConfig) -> float:
    """An lr that moves this policy: the one its SFT trained at (the model is known to learn at it), at least the
    run's own."""
    return max(cfg.sft.lr, cfg.rce.lr, cfg.grpo.lr)


def build_variants(
    cfg: RunConfig, findings: Sequence[Any], metric: str, *, can_prior: bool, can_residual: bool
) -> list[Variant]:
    """The grid of a verdict: references, each flagged switch alone, and combinations of the remedies.

    Remedies select their best val epoch on ``metric`` (``select=best_val``), so a remedy that hurts falls back to
    SFT instead of shipping the regression; the single switches keep the run's own ``select`` (they answer "what
    does this switch do to the run", the causes' ranking).
    """
    lr = moving_lr(cfg)
    sel = ["select=best_val", f"select_metric={metric}"]
    move_rce = [f"rce.lr={lr:g}", "rce.label_weight=0.5"]
    # GRPO at a tenth of the moving lr, anchored to SFT by an exact KL (bounded, unlike the ratio-based estimates)
    anchored = [
        f"grpo.lr={lr / 10:g}",
        "grpo.old_policy=refresh_at_start",
        "grpo.kl_reference=sft",
        "grpo.kl_estimator=exact",
    ]
    out = [*_base_variants(lr, sel, move_rce, anchored)]
    flagged = {f.check for f in findings if f.triggered}
    if "reward_shortcut" in flagged or "reward_vs_label" in flagged:
        for m in (m for m in DEBIAS_ESTIMATORS if can_prior or m != "candidate_prior"):
            out.append(
                Variant(
                    f"debias_{m}",
                    [f"reward.debias={m}", *move_rce, *anchored, *sel],
                    "remedy",
                    f"rewards de-biased by {m}, then the anchored moving pipeline",
                )
            )
    if can_residual and "baselines" in flagged:  # SFT below the raw-feature cosine: start the towers there
        out += _residual_variants(sel, move_rce, anchored)
    names = {v.name for v in out}
    for f in findings:
        if not f.triggered:
            continue
        for switch in f.switches:
            name = "switch_" + variant_name(switch)
            if name in names:
                continue
            names.add(name)
            out.append(Variant(name, switch_overrides(switch), "single", f"{f.check}: {switch} alone", f.check))
    return out


def _base_variants(lr: float, sel: list[str], move_rce: list[str], anchored: list[str]) -> list[Variant]:
    """The references (the run, SFT alone) and the remedies every verdict tests."""
    return [
        Variant(RUN, [], "reference", "the run as it was"),
        Variant(SFT_ONLY, ["rce.epochs=0", "grpo.epochs=0"], "reference", "the SFT model alone (what you have)"),
        Variant("rce_only", ["grpo.epochs=0", *sel], "remedy", "the run's RCE, no GRPO"),
        Variant(
            "rce_moving",
            ["grpo.epochs=0", *move_rce, *sel],
            "remedy",
            f"RCE at an lr that moves the policy ({lr:g}) with half the target on the label, no GRPO",
        ),
        Variant(
            "rce_grpo_anchored",
            [*move_rce, *anchored, *sel],
            "remedy",
            "moving RCE, then GRPO refreshed at its start with an exact KL to SFT",
        ),
        Variant(
            "grpo_unanchored",
            [f"rce.lr={lr:g}", f"grpo.lr={lr / 10:g}", "grpo.old_policy=refresh_at_start", *sel],
            "remedy",
            "moving RCE and GRPO chasing the reward, KL only to the refreshed old policy",
        ),
    ]


def _residual_variants(sel: list[str], move_rce: list[str], anchored: list[str]) -> list[Variant]:
    """A residual SFT (towers that start at the raw-feature cosine): alone, under the run's stages, anchored."""
    res = ["model.residual=true", "model.sim_temperature=0.1"]
    return [
        Variant(
            "residual_sft",
            [*res, "rce.epochs=0", "grpo.epochs=0"],
            "remedy",
            "a residual SFT (towers start at the raw-feature cosine), alone",
        ),
        Variant("residual_pipeline", [*res, *sel], "remedy", "a residual SFT under the run's own RCE and GRPO"),
        Variant(
            "residual_anchored",
            [*res, *move_rce, *anchored, *sel],
            "remedy",
            "a residual SFT, then the anchored moving pipeline",
        ),
    ]


def decide(vs_sft: pd.DataFrame, metric: str) -> str | None:
    """The variant to ship, or None (keep SFT): among the variants whose paired interval against SFT excludes 0 in
    ``metric``'s good direction (``verdict == "better"``), the one with the best mean effect. ``vs_sft`` is indexed
    by variant with columns ``diff`` and ``verdict`` (:func:`v3kit.ablate.stats.compare`)."""
    good = vs_sft[vs_sft["verdict"] == "better"]
    if good.empty:
        return None
    return str((good["diff"] * METRIC_DIRECTION[metric]).idxmax())
