"""The doctor's checks of GRPO's own logs (``metrics.csv``): step-0 ratio, clipping, zero-spread groups, KL growth
and pinning, entropy collapse, reward against the labels. None of them needs the data."""

from __future__ import annotations

import math

import pandas as pd

from ..config import RunConfig
from ..data.reward_stats import label_reward_agreement
from .context import (
    DoctorContext,
    Finding,
    check,
    epoch_means,
    fmt_num,
    log_rows,
    metric_column,
    skip_finding,
    val_series,
)

# ---------------------------------------------------------------- checks


def _temperature_mismatch(cfg: RunConfig, grpo_train: pd.DataFrame) -> str | None:
    """Why GRPO's logit temperature differs from the one the stage-1 old log-probs used, if it does."""
    sim_t = cfg.model.sim_temperature
    if sim_t is None:
        return None
    temps = metric_column(grpo_train, "temperature")
    grpo_t = float(temps.iloc[0]) if len(temps) else None
    if grpo_t is None:
        lt = cfg.grpo.logp_temperature
        grpo_t = float(lt) if isinstance(lt, (int, float)) else None
    if grpo_t is None or math.isclose(grpo_t, float(sim_t), rel_tol=1e-6):
        return None
    return (
        f"GRPO's log-probs use logit temperature {fmt_num(grpo_t)} but the old log-probs were computed at "
        f"model.sim_temperature={fmt_num(float(sim_t))}"
    )


def refresh_switch(cfg: RunConfig, old_policy: str) -> str:
    """The switch that refreshes GRPO's old policy. With the KL against the old policy (the seed's form), the stale
    SFT old policy is the run's only anchor: the clip and the KL both hold GRPO near SFT, so refreshing alone removes
    that trust region; the switch then moves the KL onto SFT in the same variant."""
    switch = f"grpo.old_policy={old_policy}"
    return switch + " grpo.kl_reference=sft" if cfg.grpo.kl_reference in ("old", None) else switch


@check("step0_ratio")
def check_step0_ratio(ctx: DoctorContext, name: str) -> Finding:
    df, cfg, th = ctx.df, ctx.cfg, ctx.th
    val0 = log_rows(df, "grpo", "val")
    val0 = val0[val0["epoch"] == 0] if "epoch" in val0.columns else val0.iloc[0:0]
    train = log_rows(df, "grpo", "train")
    eps_low = cfg.grpo.eps_low
    eps_high = cfg.grpo.eps_high
    known_eps = eps_low is not None
    eps_low = 0.2 if eps_low is None else float(eps_low)  # the kit's default when the config is not at hand
    eps_high = eps_low if eps_high is None else float(eps_high)
    clip_txt = f"[{1 - eps_low:.3g}, {1 + eps_high:.3g}]" + ("" if known_eps else " (eps assumed 0.2: no config)")
    old_policy = cfg.grpo.old_policy

    # refresh_each_epoch replaces the old policy before the first step, after the step0_* summary was taken from
    # the stage-1 one, so the first logged step is what GRPO really started from.
    use_step0 = old_policy != "refresh_each_epoch" and len(metric_column(val0, "step0_outside_clip")) > 0
    if use_step0:
        r = val0.iloc[0]
        mean, outside = float(r["step0_ratio_mean"]), float(r["step0_outside_clip"])
        std = float(r.get("step0_ratio_std", float("nan")))
        value, threshold = outside, th.step0_outside_clip
        triggered = outside > th.step0_outside_clip or abs(mean - 1) > th.step0_mean_tol
        msg = (
            f"ratio at GRPO step 0 over the training set: mean {fmt_num(mean)}, std {fmt_num(std)}, range "
            f"[{fmt_num(float(r['step0_ratio_min']))}, {fmt_num(float(r['step0_ratio_max']))}]; {outside:.1%} of entries "
            f"start outside the clip range {clip_txt} (limits: {th.step0_outside_clip:.0%}, "
            f"|mean-1| <= {th.step0_mean_tol})"
        )
    elif len(metric_column(train, "ratio_min")) and len(metric_column(train, "ratio_max")):
        r = train.dropna(subset=["ratio_min", "ratio_max"]).iloc[0]
        lo, hi = float(r["ratio_min"]), float(r["ratio_max"])
        mean = float(r["ratio_mean"]) if "ratio_mean" in r and pd.notna(r["ratio_mean"]) else float("nan")
        value, threshold = max(hi - 1, 1 - lo), min(eps_low, eps_high)
        triggered = value > threshold or abs(mean - 1) > th.step0_mean_tol
        why = (
            "grpo.old_policy=refresh_each_epoch refreshes before the first step"
            if old_policy == "refresh_each_epoch"
            else "no step0_* columns"
        )
        msg = (
            f"ratio in the first GRPO batch ({why}): mean {fmt_num(mean)}, range [{fmt_num(lo)}, {fmt_num(hi)}]; largest "
            f"distance from 1 is {fmt_num(value)} vs the clip range {clip_txt}"
        )
    else:
        return skip_finding(
            name, "no GRPO step-0 ratio (no step0_* columns and no GRPO train rows with ratio_*)", th.step0_outside_clip
        )

    if not triggered:
        return Finding(name, False, value, threshold, msg, "")
    mismatch = _temperature_mismatch(cfg, train)
    rce_epochs = cfg.rce.epochs
    causes, fixes = [], []
    if old_policy == "sft" and (rce_epochs is None or rce_epochs > 0):
        causes.append("stale old policy: old_log_probs come from SFT and RCE has moved the policy since")
        if cfg.grpo.kl_reference in ("old", None):
            causes.append(
                "but that stale SFT old policy is also the run's trust region (clip and KL both measure "
                "against SFT), so refresh only with the KL anchored to SFT"
            )
        fixes.append(refresh_switch(cfg, "refresh_at_start"))
    if mismatch:
        causes.append(mismatch)
        sim_t = cfg.model.sim_temperature
        fixes.append(f"grpo.logp_temperature={fmt_num(float(sim_t))}")
        if not any(f.startswith("grpo.old_policy=refresh_at_start") for f in fixes):
            fixes.append(refresh_switch(cfg, "refresh_at_start"))
    if not causes:
        causes.append(
            "stale old policy or logit-temperature mismatch" + (" (no config to tell which)" if not cfg else "")
        )
        fixes += [
            refresh_switch(cfg, "refresh_at_start"),
            "check grpo.logp_temperature against model.sim_temperature",
        ]
    switches = [f for f in fixes if "=" in f and not f.startswith("check ")]
    return Finding(
        name, True, value, threshold, f"{msg}. Likely cause: {'; '.join(causes)}", " or ".join(fixes), switches
    )


def _window_mean(values: pd.Series, frac: float, last: bool) -> float:
    k = max(1, math.ceil(len(values) * frac))
    part = values.iloc[-k:] if last else values.iloc[:k]
    return float(part.mean())


@check("clip_ratio")
def check_clip_ratio(ctx: DoctorContext, name: str) -> Finding:
    df, cfg, th = ctx.df, ctx.cfg, ctx.th
    clip = metric_column(log_rows(df, "grpo", "train"), "clip_ratio")
    if clip.empty:
        return skip_finding(name, "no GRPO train rows with clip_ratio", th.clip_ratio)
    early, late = _window_mean(clip, th.clip_window, False), _window_mean(clip, th.clip_window, True)
    value = max(early, late)
    share = f"{th.clip_window:.0%}"
    msg = (
        f"mean clip_ratio over the first {share} of GRPO steps {early:.3f}, over the last {share} {late:.3f} "
        f"(overall {clip.mean():.3f}, {len(clip)} steps)"
    )
    if value <= th.clip_ratio:
        return Finding(name, False, value, th.clip_ratio, msg, "")
    old_policy = cfg.grpo.old_policy
    fixes = []
    if early > th.clip_ratio:
        msg += "; high from the start: GRPO starts outside the trust region"
        fixes.append(refresh_switch(cfg, "refresh_at_start"))
    if late > th.clip_ratio:
        if old_policy in ("sft", "refresh_at_start", None):
            msg += "; high at the end: the old policy is never refreshed, so the policy drifts out of the clip range"
            fixes.append(refresh_switch(cfg, "refresh_each_epoch"))
        else:
            msg += "; high at the end although the old policy is refreshed every epoch: each epoch moves too far"
        fixes.append(
            "a lower grpo.lr, or grpo.eps_high=0.28 (clip-higher), or grpo.loss_type=cispo (clipped "
            "entries keep a gradient)"
        )
    switches = [f for f in fixes if not f.startswith("a lower")]  # a refresh switch is one variant, even with two keys
    if late > th.clip_ratio:
        switches += ["grpo.eps_high=0.28", "grpo.loss_type=cispo"]
    return Finding(
        name,
        True,
        value,
        th.clip_ratio,
        msg + " -> updates throttled",
        " or ".join(dict.fromkeys(fixes)),
        list(dict.fromkeys(switches)),
    )


@check("zero_std_groups")
def check_zero_std(ctx: DoctorContext, name: str) -> Finding:
    df, cfg, th = ctx.df, ctx.cfg, ctx.th
    frac = metric_column(log_rows(df, "grpo", "train"), "frac_reward_zero_std")
    if frac.empty:
        return skip_finding(name, "no GRPO train rows with frac_reward_zero_std", th.zero_std_frac)
    value = float(frac.mean())
    msg = (
        f"mean share of groups with no reward spread (advantage 0, no signal) {value:.1%} over {len(frac)} GRPO "
        f"steps (max {float(frac.max()):.1%})"
    )
    if value <= th.zero_std_frac:
        return Finding(name, False, value, th.zero_std_frac, msg, "")
    dropped = cfg.grpo.drop_zero_std_groups
    fix = "data reward weights (rewards that tie within a group carry no ranking signal)"
    if dropped is not True:
        fix = "grpo.drop_zero_std_groups=true (stop them diluting the loss), and " + fix
    else:
        msg += " (already dropped from the loss, but those queries teach GRPO nothing)"
    return Finding(name, True, value, th.zero_std_frac, msg, fix)


@check("kl_growth")
def check_kl_growth(ctx: DoctorContext, name: str) -> Finding:
    df, cfg, th = ctx.df, ctx.cfg, ctx.th
    series = val_series(log_rows(df, "grpo", "val"), "kl_to_sft")
    what = "KL(policy || SFT) on val"
    train_kl = epoch_means(log_rows(df, "grpo", "train"), "kl")
    if len(series) < 2:  # fall back on the penalty's own KL (against its reference, per training epoch)
        series, what = train_kl, "penalty KL (train, epoch means, against its own reference)"
    if len(series) < 2:
        return skip_finding(name, "needs KL at two or more GRPO epochs (val kl_to_sft or train kl)", th.kl_high)
    n = len(series) - 1
    j = min(max(round(n * 2 / 3), 0), n - 1)  # the point a third of the way back from the end
    start, end, mid = float(series.iloc[0]), float(series.iloc[-1]), float(series.iloc[j])
    rise_frac = (end - mid) / end if end > 0 else 0.0
    change = f"rose by {fmt_num(end - mid)}" if end >= mid else f"fell by {fmt_num(mid - end)}"
    msg = (
        f"{what}: {fmt_num(start)} -> {fmt_num(end)} nats over GRPO; since epoch {series.index[j]} it {change} "
        f"({rise_frac:+.0%} of its final value; 'still climbing' from {th.kl_still_rising:.0%})"
    )
    triggered = end >= th.kl_high and rise_frac >= th.kl_still_rising
    if what.startswith("KL(policy") and len(train_kl) >= 2:
        msg += f"; the penalty's own KL went {fmt_num(float(train_kl.iloc[0]))} -> {fmt_num(float(train_kl.iloc[-1]))}"
    if not triggered:
        return Finding(name, False, end, th.kl_high, msg, "")
    ref, old_policy = cfg.grpo.kl_reference, cfg.grpo.old_policy
    beta = cfg.grpo.kl_beta
    if ref == "old" and old_policy in ("refresh_at_start", "refresh_each_epoch"):
        msg += "; the penalty measures KL to the refreshed old policy, so it does not anchor to SFT"
        fix = "grpo.kl_reference=sft"
    elif ref in ("old", None):
        fix = "grpo.kl_reference=sft, or a larger grpo.kl_beta" + (
            f" (now {fmt_num(float(beta))})" if beta is not None else ""
        )
    else:
        fix = (
            f"a larger grpo.kl_beta (now {fmt_num(float(beta)) if beta is not None else '?'}), a lower grpo.lr or "
            f"fewer grpo.epochs"
        )
    return Finding(name, True, end, th.kl_high, msg + " -> growing without bound", fix)


@check("kl_pinned")
def check_kl_pinned(ctx: DoctorContext, name: str) -> Finding:
    df, cfg, th = ctx.df, ctx.cfg, ctx.th
    kl = metric_column(log_rows(df, "grpo", "train"), "kl")
    beta = cfg.grpo.kl_beta
    if kl.empty:
        return skip_finding(name, "no GRPO train rows with kl", th.kl_pinned)
    value = float(kl.mean())
    msg = f"mean penalty KL over {len(kl)} GRPO steps {fmt_num(value)} nats (max {fmt_num(float(kl.max()))})"
    if beta is not None:
        msg += f", kl_beta {fmt_num(float(beta))}"
    off = beta is not None and float(beta) == 0.0
    if value > th.kl_explode and not off:
        est = cfg.grpo.kl_estimator
        fixes = []
        if est != "exact":
            fixes.append("grpo.kl_estimator=exact")  # the whole-group KL is bounded by the policies, not the ratio
        if cfg.grpo.old_policy == "sft" and (cfg.rce.epochs or 0) > 0:
            fixes.append("grpo.old_policy=refresh_at_start grpo.kl_reference=sft")
        return Finding(
            name,
            True,
            value,
            th.kl_explode,
            msg + f" -> the KL penalty explodes (mean above {fmt_num(th.kl_explode)} nats): its estimate follows "
            "the PPO ratio, so a policy far from the penalty's reference makes the KL term, not the "
            "reward, drive the updates",
            " or ".join(fixes) or "a lower grpo.lr",
            fixes or [],
        )
    if value >= th.kl_pinned and not off:
        return Finding(name, False, value, th.kl_pinned, msg, "")
    if off:
        return Finding(
            name,
            True,
            value,
            th.kl_pinned,
            msg + " -> kl_beta=0: the KL term is switched off",
            "grpo.kl_beta=0.1 (with grpo.kl_reference=sft to anchor to SFT)",
        )
    # Two ways to sit at 0: the reference follows the policy (a refreshed old policy), or the policy never moves.
    drift = val_series(log_rows(df, "grpo", "val"), "kl_to_sft")
    if len(drift) and float(drift.iloc[-1]) < th.kl_pinned:
        return Finding(
            name,
            True,
            value,
            th.kl_pinned,
            msg + f" -> pinned at ~0, and the policy ended only {fmt_num(float(drift.iloc[-1]))} nats from "
            f"SFT: GRPO barely moved it",
            "a larger grpo.lr or more grpo.epochs",
        )
    ref = cfg.grpo.kl_reference
    fix = "grpo.kl_reference=sft" if ref != "sft" else "check that the reference is the SFT model"
    return Finding(
        name,
        True,
        value,
        th.kl_pinned,
        msg + " -> pinned at ~0: the KL term does nothing (its reference moves with the policy)",
        fix,
    )


@check("entropy_collapse")
def check_entropy(ctx: DoctorContext, name: str) -> Finding:
    df, th = ctx.df, ctx.th
    series, what = val_series(log_rows(df, "grpo", "val"), "entropy"), "val entropy"
    if len(series) < 2:
        series, what = epoch_means(log_rows(df, "grpo", "train"), "entropy"), "train entropy (epoch means)"
    if len(series) < 2:
        return skip_finding(name, "needs entropy at two or more GRPO points (val or train)", th.entropy_drop)
    start, end = float(series.iloc[0]), float(series.iloc[-1])
    sft_h = val_series(log_rows(df, "rce", "val"), "entropy")
    sft_start = float(sft_h.iloc[0]) if len(sft_h) and 0 in sft_h.index and what == "val entropy" else None
    ref, ref_name = (sft_start, "SFT") if sft_start is not None else (start, "the GRPO start")
    if not ref > 0:
        return skip_finding(
            name, f"{ref_name} has entropy {fmt_num(ref)}: no relative drop to measure", th.entropy_drop
        )
    drop = (ref - end) / ref
    msg = f"{what}: {fmt_num(start)} -> {fmt_num(end)} nats over GRPO"
    if sft_start is not None:
        msg += f" (SFT: {fmt_num(sft_start)})"
    msg += f", {abs(drop):.1%} {'below' if drop >= 0 else 'above'} {ref_name}'s"
    if drop <= th.entropy_drop:
        return Finding(name, False, drop, th.entropy_drop, msg, "")
    return Finding(
        name,
        True,
        drop,
        th.entropy_drop,
        msg + " -> entropy collapse",
        "grpo.eps_high=0.28 (DAPO clip-higher), or grpo.entropy_coef=0.01 (entropy bonus), or "
        "grpo.kl_reference=sft with a larger grpo.kl_beta, or a lower grpo.lr",
    )


_LABEL_METRICS = ("acc@1", "mrr", "utility@1")


def _rel(a: pd.Series, b: pd.Series, m: str) -> tuple[float, float, float] | None:
    """(before, after, relative change) of metric ``m``; None when either is missing or ``before`` is 0."""
    if m in a.index and m in b.index and pd.notna(a[m]) and pd.notna(b[m]) and a[m] != 0:
        return float(a[m]), float(b[m]), (float(b[m]) - float(a[m])) / abs(float(a[m]))
    return None


def _reward_gain(a: pd.Series, b: pd.Series) -> tuple[str, float] | None:
    """How much the reward of the top-1 pick improved from row ``a`` to ``b``, as a share that no constant shift or
    positive scaling of the reward can change: the relative fall of ``regret@1`` (best reward in the group minus
    the top-1's), else the relative rise of ``ndcg@5`` (gains are rewards minus the group minimum). ``reward@1``'s
    relative change is not used: adding a constant to every reward changes it at will."""
    r = _rel(a, b, "regret@1")
    if r is not None:
        how = f"reward gain {-r[2]:.1%}" if r[2] <= 0 else f"reward loss {r[2]:.1%}"
        return f"regret@1 {fmt_num(r[0])}->{fmt_num(r[1])} ({how} of the regret)", -r[2]
    r = _rel(a, b, "ndcg@5")
    if r is not None:
        return f"ndcg@5 {fmt_num(r[0])}->{fmt_num(r[1])} ({r[2]:+.1%})", r[2]
    return None


def _disagreement(ctx: DoctorContext) -> str:
    """The share of held-out groups whose highest-reward candidate is not the label (needs the data)."""
    splits = ctx.data()
    if splits is None:
        return ""

    return (
        f"; the reward's top candidate is not the label in {1 - label_reward_agreement(splits.val):.0%} of the "
        f"val groups"
    )


@check("reward_vs_label")
def check_reward_vs_label(ctx: DoctorContext, name: str) -> Finding:
    """Reward up while a label metric falls. The reward side is read off regret@1 (or ndcg@5), so the verdict does
    not depend on the reward's offset or scale; label metrics are relative changes of acc@1 / mrr (/ utility@1
    where the data has a true utility)."""
    df, th = ctx.df, ctx.th
    grpo_val, rce_val = log_rows(df, "grpo", "val"), log_rows(df, "rce", "val")
    if len(grpo_val) < 2:
        return skip_finding(name, "needs val rows at the GRPO start and end", th.label_drop)
    end = grpo_val.iloc[-1]
    windows = [("GRPO start -> end", grpo_val.iloc[0])]
    sft_rows = rce_val[rce_val["epoch"] == 0] if "epoch" in rce_val.columns else rce_val.iloc[0:0]
    if len(sft_rows) and len(val_series(rce_val, "acc@1")) > 1:  # with RCE the SFT baseline differs
        windows.insert(0, ("SFT -> GRPO end", sft_rows.iloc[-1]))
    parts, hits, drops_all, names = [], [], [], set()
    for label, start in windows:
        gain = _reward_gain(start, end)
        ch = {m: r for m in _LABEL_METRICS if (r := _rel(start, end, m)) is not None}
        if gain is None or not ch:
            continue
        desc = ", ".join(
            f"{m}{' (hidden truth)' if m == 'utility@1' else ''} {fmt_num(a)}->{fmt_num(b)} ({r:+.1%})"
            for m, (a, b, r) in ch.items()
        )
        drop = max(-r for (_, _, r) in ch.values())  # largest relative fall of a label metric
        fallen = [m for m, (_, _, r) in ch.items() if -r > th.label_drop]
        hit = gain[1] > th.reward_rise and bool(fallen)
        drops_all.append(drop)
        if hit:
            hits.append(drop)
            names.update(fallen)
        parts.append(f"{label}: {gain[0]}, {desc}" + (f" [reward up, {'/'.join(fallen)} down]" if hit else ""))
    if not parts:
        return skip_finding(
            name, "needs regret@1 (or ndcg@5) and a label metric (acc@1 / mrr) at the GRPO start and end", th.label_drop
        )
    msg = "; ".join(parts) + (
        f" (a reward gain > {th.reward_rise:.1%} with a label fall > {th.label_drop:.1%} flags){_disagreement(ctx)}"
    )
    if not hits:
        return Finding(name, False, max(drops_all), th.label_drop, msg, "")
    return Finding(
        name,
        True,
        max(hits),
        th.label_drop,
        msg + f" -> 'worse' depends on the metric: the reward disagrees with "
        f"{'/'.join(m for m in _LABEL_METRICS if m in names)}",
        "rce.label_weight=0.5 (keep the labels in the RCE targets), or fix the data's reward weights so "
        "the reward agrees with the labels; judge runs by the metric you ship",
        ["rce.label_weight=0.5"],
    )
