"""The doctor's checks that need the run's data (rebuilt from its ``config.yaml``) or checkpoints: RCE convergence
against its loss floor, the reward's query-independent shortcut, RCE target sharpness, SFT against trivial rankers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from .context import DoctorContext, Finding, Thresholds, _col, _g, _get, _rows, _skip, _val_series, check


def _rce_gaps(ctx: DoctorContext, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series] | None:
    """Per logged RCE step: the loss floor H(targets) at that step's temperatures, and the gap the SFT policy has
    to that floor there, KL(targets || pi_SFT), both on the run's training split; None without data or SFT.

    The SFT gap is the yardstick: as the temperature anneals the targets sharpen, so both the floor and the gap of
    any fixed policy change; ``1 - (loss - floor) / gap_SFT`` is the share of the gap RCE closed at that temperature.
    """
    splits, sft = ctx.data(), ctx.sft_model()
    if splits is None or sft is None:
        return None
    from ..train.losses import rce_targets
    from ..train.model import compute_log_probs
    from ..train.rce import rce_config_from

    rce = rce_config_from(_get(ctx.config, "rce"))
    label_weight, norm = rce.label_weight, rce.reward_norm
    model, sim_t = sft
    train = splits.train
    if "temperature" not in rows.columns or rows["temperature"].isna().any():
        return None
    cache: dict[float, tuple[float, float]] = {}
    logp_cache: dict[float, Any] = {}

    def terms(t: float) -> tuple[float, float]:
        key = round(float(t), 4)
        if key not in cache:
            reward_t, logit_t = rce.temperatures(key, sim_t)
            if logit_t not in logp_cache:
                logp_cache[logit_t] = compute_log_probs(model, train, logit_t)
            logp = logp_cache[logit_t]
            tg = rce_targets(
                train.labels, train.rewards, reward_t, mask=train.mask, label_weight=label_weight, reward_norm=norm
            )
            keep = train.mask & (tg > 0)
            h = float(-(tg * tg.clamp_min(1e-30).log()).masked_fill(~keep, 0.0).sum(1).mean())
            ce = float(-(tg * logp).masked_fill(~keep, 0.0).sum(1).mean())
            cache[key] = (h, ce - h)
        return cache[key]

    pairs = rows["temperature"].map(terms)
    return pairs.map(lambda p: p[0]), pairs.map(lambda p: p[1])


def _two_windows(values: pd.Series, epochs: pd.Series) -> tuple[float, float, str] | None:
    """Mean of the previous and of the last RCE epoch (or the two halves of a single epoch)."""
    means = values.groupby(epochs).mean().sort_index()
    if len(means) >= 2:
        return float(means.iloc[-2]), float(means.iloc[-1]), f"epoch {means.index[-2]} -> {means.index[-1]}"
    half = len(values) // 2
    if half < 1:
        return None
    return (
        float(values.iloc[:half].mean()),
        float(values.iloc[half:].mean()),
        "first -> second half of the only RCE epoch",
    )


@check("rce_converged")
def check_rce_converged(ctx: DoctorContext) -> Finding:
    """Did RCE move the policy, and has it stopped closing its gap to the loss floor?

    Judged from ``metrics.csv`` and the data alone (never the per-epoch checkpoints, which ablation folders delete),
    so a full run and its ablation copy get the same verdict: KL(RCE policy || SFT) from the val rows, and the
    logged loss minus its floor H(targets) at each step's temperature = KL(targets || policy), the part of the loss
    RCE can reduce (the raw loss also falls as the annealed temperature sharpens the targets, learning or not).
    At a tiny lr the progress per epoch is small but constant, so "the last epoch gained as much as the average"
    says nothing; what counts is how much of the starting gap was closed, and how far the policy moved.
    """
    df, config, th, name = ctx.df, ctx.config, ctx.th, ctx.check
    rce = _rows(df, "rce", "train")
    rce = rce.dropna(subset=["loss"]) if "loss" in rce.columns else rce.iloc[0:0]
    if rce.empty:
        epochs = _get(config, "rce.epochs")
        why = "no RCE steps" + (f" (rce.epochs={epochs}): GRPO started from SFT" if epochs is not None else "")
        return _skip(name, why, th.rce_still_closing)
    moved_s = _val_series(_rows(df, "rce", "val"), "kl_to_sft")
    moved = float(moved_s.iloc[-1]) if len(moved_s) else None
    n = _get(config, "rce.epochs")
    n = int(n) if n is not None else int(rce["epoch"].max())
    lr = _get(config, "rce.lr")
    gaps = _rce_gaps(ctx, rce)
    closed_total = closed_last = None
    if gaps is not None:
        floor, gap_sft = gaps
        excess = rce["loss"] - floor

        def closed(sel: pd.Series) -> float:  # share of SFT's gap closed over the steps in sel
            g = float(gap_sft[sel].sum())
            return 1.0 - float(excess[sel].sum()) / g if g > 0 else 1.0

        epochs = sorted(rce["epoch"].unique())
        if len(epochs) >= 2:
            prev_sel, last_sel = rce["epoch"] == epochs[-2], rce["epoch"] == epochs[-1]
            where = f"epoch {epochs[-2]} -> {epochs[-1]}"
        else:
            half = len(rce) // 2
            if half < 1:
                return _skip(name, "a single RCE step: nothing to compare", th.rce_still_closing)
            pos = pd.Series(range(len(rce)), index=rce.index)
            prev_sel, last_sel = pos < half, pos >= half
            where = "first -> second half of the only RCE epoch"
        closed_prev, closed_total = closed(prev_sel), closed(last_sel)
        closed_last = closed_total - closed_prev
        norm = _get(ctx.config, "rce.reward_norm") or "none"
        unit = "T in raw reward units" if norm == "none" else f"rewards normalised per group ({norm})"
        msg = (
            f"RCE loss above its floor H(targets), as a share of the SFT policy's gap KL(targets || SFT) at the "
            f"same temperatures ({unit}): RCE closed {closed_prev:.1%} of it by the previous window and "
            f"{closed_total:.1%} by the "
            f"last ({where}): {closed_last:+.1%} in the last window ('still closing' from "
            f"{th.rce_still_closing:.0%}; SFT's gap in the last window {_g(float(gap_sft[last_sel].mean()))} nats)"
        )
    else:
        windows = _two_windows(rce["loss"], rce["epoch"])
        if windows is None:
            return _skip(name, "a single RCE step: nothing to compare", th.rce_still_falling)
        prev, last, where = windows
        if not prev > 0:
            return _skip(name, f"RCE loss {_g(prev)} is not positive: no relative change", th.rce_still_falling)
        fall = (prev - last) / prev
        msg = f"logged RCE loss, {where}: {_g(prev)} -> {_g(last)}, a {fall:.1%} fall"
        temps = _col(rce, "temperature")
        if len(temps) and not math.isclose(float(temps.iloc[0]), float(temps.iloc[-1]), rel_tol=1e-3):
            msg += (
                " (the annealed temperature sharpens the targets, which lowers the loss without any learning, so "
                "this overstates it; on a run dir the doctor measures the loss above its floor H(targets))"
            )
    if moved is not None:
        msg += f"; RCE moved the policy {_g(moved)} nats (KL to SFT, val)"
    if moved is not None and moved < th.rce_min_kl and (closed_total is None or closed_total < th.rce_min_closed):
        fix = f"rce.lr={10 * float(lr):g}" if lr is not None else "a 10x larger rce.lr"
        more = ""
        if closed_total is not None and closed_total > 0:
            more = f" (at this pace closing half the gap would take ~{0.5 * n / closed_total:.0f} epochs)"
        return Finding(
            name,
            True,
            moved,
            th.rce_min_kl,
            msg + f" -> lr too small to move the policy: RCE left it about where SFT put it{more}; a larger "
            f"lr is the test, not more epochs",
            fix,
            [fix] if lr is not None else [],
        )
    more_epochs = f"rce.epochs={max(5, 2 * n)}"
    if closed_last is not None:
        if closed_last >= th.rce_still_closing:
            return Finding(
                name,
                True,
                closed_last,
                th.rce_still_closing,
                msg + " -> RCE was still closing its gap to the floor when GRPO started",
                more_epochs + " (more RCE)",
                [more_epochs],
            )
        return Finding(name, False, closed_last, th.rce_still_closing, msg, "")
    if fall > th.rce_still_falling:
        return Finding(
            name,
            True,
            fall,
            th.rce_still_falling,
            msg + " -> RCE had not converged before GRPO",
            more_epochs + " (more RCE)",
            [more_epochs],
        )
    return Finding(name, False, fall, th.rce_still_falling, msg, "")


def _logit_change(ctx: DoctorContext, data: Any) -> tuple[Any, str] | None:
    """``log pi_final - log pi_SFT`` on ``data`` from the run dir's checkpoints (the last GRPO, else RCE, epoch
    against ``sft.pt`` or the recorded SFT checkpoint), and which policy it is; None when they are not there."""
    if ctx.run_dir is None:
        return None
    from ..pipeline import recorded_sft_checkpoint
    from ..train.checkpoint import epoch_checkpoints, load_checkpoint, model_from_checkpoint
    from ..train.model import compute_log_probs

    final = None
    for stage in ("grpo", "rce"):
        found = epoch_checkpoints(ctx.run_dir, stage)
        if found:
            final = (stage, *found[-1])
            break
    sft = recorded_sft_checkpoint(ctx.run_dir) or ctx.run_dir / "sft.pt"
    if final is None or not Path(sft).is_file():
        return None
    stage, epoch, path = final
    logps = []
    for p in (path, sft):
        ckpt = load_checkpoint(p)
        logps.append(
            compute_log_probs(model_from_checkpoint(ckpt, p), data, float(ckpt["model_config"]["sim_temperature"]))
        )
    return logps[0] - logps[1], f"{stage} epoch {epoch}"


@check("reward_shortcut")
def check_reward_shortcut(ctx: DoctorContext) -> Finding:
    """How much of the within-group reward any query would give the candidate (v3kit/data/shortcut.py), and, with the
    checkpoints, whether the policy's change from SFT followed that part rather than the label."""
    th, name = ctx.th, ctx.check
    splits = ctx.data()
    if splits is None:
        return _skip(name, ctx.data_missing(), th.shortcut_share)
    from ..data.shortcut import reward_shortcut

    train = splits.train
    change = _logit_change(ctx, train)
    a = reward_shortcut(train, None if change is None else change[0])
    msg = (
        f"candidate features alone (cross-fitted ridge, {a.k_folds} folds of queries) explain "
        f"{a.explained_share:.1%} of the within-group reward variance on the training split; ranking by that query-independent part "
        f"alone gives acc@1 {a.acc_shortcut:.3f} (the reward's own argmax: {a.acc_reward:.3f})"
    )
    if change is not None:
        msg += (
            f"; the policy's change of logits from SFT ({change[1]}) correlates {a.corr_change_shortcut:+.2f} with "
            f"the query-independent part, {a.corr_change_rest:+.2f} with the query-dependent rest and "
            f"{a.corr_change_label:+.2f} with the label"
        )
    if not a.explained_share >= th.shortcut_share:
        return Finding(name, False, a.explained_share, th.shortcut_share, msg, "")
    followed = (
        change is not None
        and a.corr_change_shortcut is not None
        and a.corr_change_label is not None
        and a.corr_change_shortcut > a.corr_change_label
    )
    debias_msg, debias_switches, reports = _debias_options(splits, ctx.th)
    switches = [*debias_switches, "rce.label_weight=0.5"]
    return Finding(
        name,
        True,
        a.explained_share,
        th.shortcut_share,
        msg
        + " -> "
        + _shortcut_kind(reports, th)
        + (", and the policy learnt that more than the label" if followed else "")
        + "; "
        + debias_msg,
        " or ".join(
            [
                *(f"{d} (de-bias the training rewards)" for d in debias_switches),
                "rce.label_weight=0.5 (anchor the RCE targets to the labels)",
            ]
        ),
        switches,
    )


def _shortcut_kind(reports: dict[str, tuple[Any, bool]], th: Thresholds) -> str:
    """Which of two things the candidate features' share is: a reward that favours a candidate whatever the query
    (the per-candidate prior, fitted on recurring candidate ids, explains as much of the reward), or label signal
    the candidate features carry (removing the feature estimate lowers the reward's label agreement on val)."""
    prior, feats = reports.get("candidate_prior"), reports.get("candidate_features")
    if prior is not None and prior[0].removed_share >= th.shortcut_share:
        return (
            "the reward favours a candidate whatever the query (the per-candidate prior alone explains "
            f"{prior[0].removed_share:.1%} of the within-group reward variance)"
        )
    if feats is not None and not feats[1]:
        rep = feats[0]
        return (
            "this is label signal carried by the candidate features, not a reward that favours a candidate "
            f"whatever the query: removing it lowers the reward's val label agreement ({rep.agreement_before:.3f} "
            f"-> {rep.agreement_after:.3f})"
            + (f" and the per-candidate prior explains only {prior[0].removed_share:.1%}" if prior else "")
        )
    return "the reward pays for something in the candidate's features whatever the query"


def _debias_options(splits: Any, th: Thresholds) -> tuple[str, list[str], dict[str, tuple[Any, bool]]]:
    """Which reward de-biasing keeps the reward's label agreement on val (v3kit/data/debias.py): the methods that do,
    best first, as switches, and a sentence with both methods' numbers. A method that lowers the agreement by more
    than ``th.debias_agreement_drop`` is named as one *not* to use: its estimate carries label signal."""
    from ..data.debias import DebiasError, RewardConfig, debias_report

    parts, keep = [], []
    reports: dict[str, tuple[Any, bool]] = {}
    for method in ("candidate_prior", "candidate_features"):
        try:
            _, rep = debias_report(method, splits, RewardConfig(debias=method))
        except DebiasError as e:
            parts.append(f"{method}: unavailable ({str(e).split(':')[0].replace('reward.debias=', '')})")
            continue
        ok = rep.agreement_after >= rep.agreement_before - th.debias_agreement_drop
        reports[method] = (rep, ok)
        parts.append(
            f"{method} removes {rep.removed_share:.0%} of the reward variance, val label agreement "
            f"{rep.agreement_before:.3f} -> {rep.agreement_after:.3f}"
            + ("" if ok else " (lowers it: its estimate carries label signal, do not use it)")
        )
        if ok:
            keep.append((rep.agreement_after, f"reward.debias={method}"))
    keep.sort(key=lambda t: -t[0])
    return "de-biasing: " + "; ".join(parts), [k for _, k in keep], reports


def target_concentration(
    data: Any, temperature: float, *, label_weight: float = 0.0, reward_norm: str = "none", one_hot_weight: float = 0.95
) -> tuple[float, float]:
    """(mean top-1 weight of RCE's targets, share of groups whose top-1 weight >= ``one_hot_weight``) at a reward
    temperature on ``data``."""
    from ..train.losses import rce_targets

    t = rce_targets(
        data.labels, data.rewards, temperature, mask=data.mask, label_weight=label_weight, reward_norm=reward_norm
    )
    top = t.masked_fill(~data.mask, 0.0).amax(dim=1)
    return float(top.mean()), float((top >= one_hot_weight).float().mean())


@check("rce_targets")
def check_rce_targets(ctx: DoctorContext) -> Finding:
    """How concentrated RCE's targets are at t_start and t_end. The temperature divides the raw rewards (unless
    ``rce.reward_norm`` normalises them per group), so its meaning is in units of the reward: the same t_end gives
    near-uniform targets on a small-scale reward and one-hot ones on a large-scale reward."""
    th, name = ctx.th, ctx.check
    splits = ctx.data()
    if splits is None:
        return _skip(name, ctx.data_missing(), th.one_hot_share)
    from ..data.reward_stats import reward_spread
    from ..train.rce import rce_config_from

    rce = rce_config_from(_get(ctx.config, "rce"))
    train = splits.train
    temps = tuple(rce.temperatures(t, 1.0)[0] for t in (rce.t_start, rce.t_end))  # the targets' T
    (top_s, hot_s), (top_e, hot_e) = (
        target_concentration(
            train, t, label_weight=rce.label_weight, reward_norm=rce.reward_norm, one_hot_weight=th.one_hot_weight
        )
        for t in temps
    )
    n = train.mask.sum(1).float()
    spread = float(reward_spread(train).median())
    unit = (
        "raw reward units"
        if rce.reward_norm == "none"
        else "units of the group's reward std"
        if rce.reward_norm == "zscore"
        else "within-group rank in [0, 1]"
    )
    msg = (
        f"RCE targets (reward_norm={rce.reward_norm}; T in {unit}; median within-group reward std "
        f"{_g(spread)}): mean top-1 weight {top_s:.2f} at T={_g(temps[0])} and {top_e:.2f} at T={_g(temps[1])} "
        f"(uniform: {float((1 / n).mean()):.2f}); effectively one-hot (top-1 >= {th.one_hot_weight:.0%}) in "
        f"{hot_s:.0%} and {hot_e:.0%} of groups"
    )
    if _get(ctx.config, "rce.epochs") == 0:
        return Finding(name, False, hot_e, th.one_hot_share, msg + " (RCE was off in this run)", "")
    if hot_e < th.one_hot_share:
        return Finding(name, False, hot_e, th.one_hot_share, msg, "")
    fix = "rce.reward_norm=zscore" if rce.reward_norm == "none" else f"rce.t_end={_g(2 * rce.t_end)}"
    return Finding(
        name,
        True,
        hot_e,
        th.one_hot_share,
        msg + " -> at t_end RCE mostly imitates the reward's argmax: the schedule is set by the reward's "
        "scale, not by the softness you chose",
        f"{fix} (softer targets at the same temperature schedule)",
        [fix],
    )


@check("baselines")
def check_baselines(ctx: DoctorContext) -> Finding:
    """SFT against trivial rankers on the val split (v3kit/train/baselines.py): random (expected), raw-feature cosine
    (when the dims match) and the reward's own argmax; SFT below raw cosine means the v2 model is the weakest link."""
    name = ctx.check
    splits = ctx.data()
    if splits is None:
        return _skip(name, ctx.data_missing())
    from ..train.baselines import baseline_table

    table = baseline_table(splits.val)
    sft_rows = _rows(ctx.df, "rce", "val")
    sft_rows = sft_rows[sft_rows["epoch"] == 0] if "epoch" in sft_rows.columns else sft_rows.iloc[0:0]
    if sft_rows.empty:
        sft_rows = _rows(ctx.df, "grpo", "val").iloc[:1]  # no RCE: GRPO's epoch 0 is SFT
    metrics = [m for m in ("acc@1", "mrr") if m in table.columns]
    parts = [f"{b}: " + ", ".join(f"{m} {table.loc[b, m]:.3f}" for m in metrics) for b in table.index]
    oracle = table.loc["reward_oracle", "acc@1"]
    msg = (
        f"val split, {'; '.join(parts)} (the reward's argmax is the label in {oracle:.0%} of groups: reward-label "
        f"disagreement {1 - oracle:.0%})"
    )
    if sft_rows.empty or "acc@1" not in sft_rows.columns:
        return Finding(name, False, None, None, msg + "; no SFT row in metrics.csv to compare", "")
    sft = sft_rows.iloc[0]
    msg = (
        f"SFT acc@1 {float(sft['acc@1']):.3f}"
        + (f", mrr {float(sft['mrr']):.3f}" if "mrr" in sft.index else "")
        + f"; {msg}"
    )
    if "raw_cosine" not in table.index:
        return Finding(
            name,
            False,
            float(sft["acc@1"]),
            float(table.loc["random", "acc@1"]),
            msg + " (no raw cosine: query and candidate features differ in dim)",
            "",
        )
    cos = float(table.loc["raw_cosine", "acc@1"])
    value = float(sft["acc@1"])
    if value >= cos:
        return Finding(name, False, value, cos, msg, "")
    from ..train.model import DEFAULT_TARGET

    target = _get(ctx.config, "model.target")
    if target in (None, DEFAULT_TARGET):
        switch = "model.residual=true model.sim_temperature=0.1"
        fix = (
            f"{switch} (towers that start as the raw-feature cosine and learn a correction, so SFT cannot start "
            "below it), then RCE/GRPO from that SFT"
        )
        switches = [switch]
    else:
        fix = (
            "start your towers at the raw features and learn a residual correction (x + f(x), f's last layer "
            "zero-initialised), or improve SFT (epochs, lr, size); RCE/GRPO start from it"
        )
        switches = []
    return Finding(
        name,
        True,
        value,
        cos,
        msg + " -> SFT ranks below the raw-feature cosine: the v2 model itself is the weakest link",
        fix,
        switches,
    )
