"""GRPO health report ("doctor"): read a run's ``metrics.csv`` (and ``config.yaml``) and check the symptoms of
the suspects in ``docs/pipeline.md`` ("Why GRPO might underperform"), each with the number behind it and a switch to try.

Checks, in report order (``Finding.check``):

* ``step0_ratio``: the PPO ratio at GRPO step 0 is not ~1 (stale old policy or temperature mismatch).
* ``clip_ratio``: the clip removes the gradient of many entries for long stretches (updates throttled).
* ``zero_std_groups``: many groups have no reward spread, hence zero advantage (no signal).
* ``kl_growth``: KL to the SFT model still climbing at the end of GRPO and already large (nothing anchors it).
* ``kl_pinned``: the KL penalty is ~0 throughout (the KL term does nothing).
* ``entropy_collapse``: the policy's entropy fell by a large fraction during GRPO.
* ``reward_vs_label``: reward@1 rose while label metrics (or, in the synthetic world, the hidden utility) fell.
* ``rce_converged``: RCE loss was still falling at its last epoch when GRPO started. On a run dir with its
  checkpoints the policies are re-scored at the final RCE temperature, because the logged loss falls with the
  annealed temperature alone (sharper targets have lower entropy); on a bare frame the logged loss is used.

A check whose stage or columns are missing is reported as skipped (``triggered=False``, ``value=None``) with the
reason; the doctor never fails on a partial run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import yaml

from .rundir import atomic_write_frame

__all__ = ["Finding", "Thresholds", "diagnose", "format_report", "report_frame", "register_cli", "load_run"]


@dataclass
class Finding:
    check: str
    triggered: bool
    value: float | None  # the number the check judged (None when skipped)
    threshold: float | None
    message: str
    suggestion: str


@dataclass
class Thresholds:
    """Defaults of every check. All are heuristics for one run; use ``v3kit ablate`` for significance."""

    # Share of (group, candidate) entries whose step-0 ratio lies outside [1 - eps_low, 1 + eps_high]. Each such
    # entry's gradient is clipped away (for one sign of its advantage) before GRPO has learnt anything; 5% means
    # the starting point already costs a visible slice of the batch.
    step0_outside_clip: float = 0.05
    # |mean step-0 ratio - 1|: a fresh old policy gives exactly 1; a shift of the mean (not just spread) is the
    # signature of a logit-temperature mismatch between old and new log-probs.
    step0_mean_tol: float = 0.05
    # Mean clip_ratio over the first or last ``clip_window`` of GRPO steps. PPO practice treats a clip fraction of
    # ~0.1-0.2 as the upper end of healthy; above 0.2 a fifth of the entries give no policy gradient.
    clip_ratio: float = 0.2
    clip_window: float = 0.25
    # Mean frac_reward_zero_std over GRPO steps: those groups have advantage 0 but still count in the loss mean,
    # so a fifth of them scales the policy gradient down by a fifth while the KL term keeps its full weight.
    zero_std_frac: float = 0.2
    # KL(policy || SFT) in nats at the end of GRPO: 0.1 nats is ~7% of the entropy of the default SFT policy
    # (~1.4 nats over 8 candidates); the KL counts as unbounded when it is that large *and* still climbing.
    kl_high: float = 0.1
    # ... still climbing = it gained at least this share of its final value over the last third of GRPO
    # (linear growth gains a third, a plateau ~0).
    kl_still_rising: float = 0.1
    # Mean penalty KL over GRPO below this (nats) = pinned at 0: the penalty and its gradient are negligible.
    kl_pinned: float = 1e-4
    # Relative entropy drop from the GRPO start to its end: losing a quarter of the starting entropy in GRPO alone
    # is the collapse DAPO's clip-higher was introduced against.
    entropy_drop: float = 0.25
    # reward@1 must rise by more than this (relative) ...
    reward_rise: float = 0.005
    # ... while acc@1, mrr or utility@1 fall by more than this (relative; 1% of acc@1 ~ 0.36 on the default
    # 450-query val split is ~2 queries, so smaller moves are noise of a single run).
    label_drop: float = 0.01
    # Relative fall of the epoch-mean RCE loss from the previous epoch to the last: >= 5% means another epoch would
    # still move it, i.e. RCE stopped before it converged.
    rce_still_falling: float = 0.05
    # With the checkpoints at hand, also: the last epoch's fall of the fixed-temperature loss as a multiple of RCE's
    # average per-epoch fall. A converging curve flattens (last epoch well below average); >= 0.5x means it has not,
    # however small the per-epoch change (a tiny lr makes every change small).
    rce_pace: float = 0.5


_CHECKS = ("step0_ratio", "clip_ratio", "zero_std_groups", "kl_growth", "kl_pinned", "entropy_collapse",
           "reward_vs_label", "rce_converged")


# ---------------------------------------------------------------- input

def load_run(run: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``metrics.csv`` and ``config.yaml`` (``{}`` if absent or unreadable) of a run dir."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run dir {run} does not exist")
    path = run / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run} a v3kit run dir (written by `v3kit run`)?")
    config: dict[str, Any] = {}
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        try:
            loaded = yaml.safe_load(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:  # a broken config only costs the cause attribution, not the report
            config = {}
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: the run wrote no metrics yet (did it start?)") from None
    missing = [c for c in ("stage", "split", "epoch", "step") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}: it is not a v3kit metrics.csv (written by `v3kit run`)")
    return frame, config


def _get(config: dict[str, Any], key: str) -> Any:
    """``config["a"]["b"]`` for ``key="a.b"``; None when any part is missing (= unknown, not the default)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _rows(df: pd.DataFrame, stage: str, split: str) -> pd.DataFrame:
    if not {"stage", "split"} <= set(df.columns):
        return df.iloc[0:0]
    out = df[(df["stage"] == stage) & (df["split"] == split)]
    order = [c for c in ("epoch", "step") if c in out.columns]
    return out.sort_values(order, kind="stable").reset_index(drop=True) if order else out.reset_index(drop=True)


def _col(rows: pd.DataFrame, name: str) -> pd.Series:
    """The non-missing values of a column (empty when the column does not exist)."""
    return rows[name].dropna() if name in rows.columns else pd.Series(dtype=float)


def _epoch_means(rows: pd.DataFrame, name: str) -> pd.Series:
    if name not in rows.columns or "epoch" not in rows.columns:
        return pd.Series(dtype=float)
    return rows.dropna(subset=[name]).groupby("epoch")[name].mean().sort_index()


def _val_series(rows: pd.DataFrame, name: str) -> pd.Series:
    """One value per evaluated epoch (the last row wins if an epoch was logged twice)."""
    if name not in rows.columns or "epoch" not in rows.columns:
        return pd.Series(dtype=float)
    return rows.dropna(subset=[name]).groupby("epoch")[name].last().sort_index()


def _g(x: float) -> str:
    return f"{x:.4g}"


def _skip(check: str, why: str, threshold: float | None = None) -> Finding:
    return Finding(check, False, None, threshold, f"skipped: {why}", "")


# ---------------------------------------------------------------- checks

def _temperature_mismatch(config: dict[str, Any], grpo_train: pd.DataFrame) -> str | None:
    """Why GRPO's logit temperature differs from the one the stage-1 old log-probs used, if it does."""
    sim_t = _get(config, "model.sim_temperature")
    if sim_t is None:
        return None
    temps = _col(grpo_train, "temperature")
    grpo_t = float(temps.iloc[0]) if len(temps) else None
    if grpo_t is None:
        lt = _get(config, "grpo.logp_temperature")
        grpo_t = float(lt) if isinstance(lt, (int, float)) else None
    if grpo_t is None or math.isclose(grpo_t, float(sim_t), rel_tol=1e-6):
        return None
    return (f"GRPO's log-probs use logit temperature {_g(grpo_t)} but the old log-probs were computed at "
            f"model.sim_temperature={_g(float(sim_t))}")


def check_step0_ratio(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "step0_ratio"
    val0 = _rows(df, "grpo", "val")
    val0 = val0[val0["epoch"] == 0] if "epoch" in val0.columns else val0.iloc[0:0]
    train = _rows(df, "grpo", "train")
    eps_low = _get(config, "grpo.eps_low")
    eps_high = _get(config, "grpo.eps_high")
    known_eps = eps_low is not None
    eps_low = 0.2 if eps_low is None else float(eps_low)  # the kit's default when the config is not at hand
    eps_high = eps_low if eps_high is None else float(eps_high)
    clip_txt = f"[{1 - eps_low:.3g}, {1 + eps_high:.3g}]" + ("" if known_eps else " (eps assumed 0.2: no config)")
    old_policy = _get(config, "grpo.old_policy")

    # refresh_each_epoch replaces the old policy before the first step, after the step0_* summary was taken from
    # the stage-1 one, so the first logged step is what GRPO really started from.
    use_step0 = old_policy != "refresh_each_epoch" and len(_col(val0, "step0_outside_clip")) > 0
    if use_step0:
        r = val0.iloc[0]
        mean, outside = float(r["step0_ratio_mean"]), float(r["step0_outside_clip"])
        std = float(r.get("step0_ratio_std", float("nan")))
        value, threshold = outside, th.step0_outside_clip
        triggered = outside > th.step0_outside_clip or abs(mean - 1) > th.step0_mean_tol
        msg = (f"ratio at GRPO step 0 over the training set: mean {_g(mean)}, std {_g(std)}, range "
               f"[{_g(float(r['step0_ratio_min']))}, {_g(float(r['step0_ratio_max']))}]; {outside:.1%} of entries "
               f"start outside the clip range {clip_txt} (limits: {th.step0_outside_clip:.0%}, "
               f"|mean-1| <= {th.step0_mean_tol})")
    elif len(_col(train, "ratio_min")) and len(_col(train, "ratio_max")):
        r = train.dropna(subset=["ratio_min", "ratio_max"]).iloc[0]
        lo, hi = float(r["ratio_min"]), float(r["ratio_max"])
        mean = float(r["ratio_mean"]) if "ratio_mean" in r and pd.notna(r["ratio_mean"]) else float("nan")
        value, threshold = max(hi - 1, 1 - lo), min(eps_low, eps_high)
        triggered = value > threshold or abs(mean - 1) > th.step0_mean_tol
        why = ("grpo.old_policy=refresh_each_epoch refreshes before the first step" if old_policy ==
               "refresh_each_epoch" else "no step0_* columns")
        msg = (f"ratio in the first GRPO batch ({why}): mean {_g(mean)}, range [{_g(lo)}, {_g(hi)}]; largest "
               f"distance from 1 is {_g(value)} vs the clip range {clip_txt}")
    else:
        return _skip(name, "no GRPO step-0 ratio (no step0_* columns and no GRPO train rows with ratio_*)",
                     th.step0_outside_clip)

    if not triggered:
        return Finding(name, False, value, threshold, msg, "")
    mismatch = _temperature_mismatch(config, train)
    rce_epochs = _get(config, "rce.epochs")
    causes, fixes = [], []
    if old_policy == "sft" and (rce_epochs is None or rce_epochs > 0):
        causes.append("stale old policy: old_log_probs come from SFT and RCE has moved the policy since")
        fixes.append("grpo.old_policy=refresh_at_start")
    if mismatch:
        causes.append(mismatch)
        sim_t = _get(config, "model.sim_temperature")
        fixes.append(f"grpo.logp_temperature={_g(float(sim_t))}")
        if "grpo.old_policy=refresh_at_start" not in fixes:
            fixes.append("grpo.old_policy=refresh_at_start")
    if not causes:
        causes.append("stale old policy or logit-temperature mismatch" + (" (no config to tell which)"
                                                                          if not config else ""))
        fixes += ["grpo.old_policy=refresh_at_start", "check grpo.logp_temperature against model.sim_temperature"]
    return Finding(name, True, value, threshold, f"{msg}. Likely cause: {'; '.join(causes)}", " or ".join(fixes))


def _window_mean(values: pd.Series, frac: float, last: bool) -> float:
    k = max(1, math.ceil(len(values) * frac))
    part = values.iloc[-k:] if last else values.iloc[:k]
    return float(part.mean())


def check_clip_ratio(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "clip_ratio"
    clip = _col(_rows(df, "grpo", "train"), "clip_ratio")
    if clip.empty:
        return _skip(name, "no GRPO train rows with clip_ratio", th.clip_ratio)
    early, late = _window_mean(clip, th.clip_window, False), _window_mean(clip, th.clip_window, True)
    value = max(early, late)
    share = f"{th.clip_window:.0%}"
    msg = (f"mean clip_ratio over the first {share} of GRPO steps {early:.3f}, over the last {share} {late:.3f} "
           f"(overall {clip.mean():.3f}, {len(clip)} steps)")
    if value <= th.clip_ratio:
        return Finding(name, False, value, th.clip_ratio, msg, "")
    old_policy = _get(config, "grpo.old_policy")
    fixes = []
    if early > th.clip_ratio:
        msg += "; high from the start: GRPO starts outside the trust region"
        fixes.append("grpo.old_policy=refresh_at_start")
    if late > th.clip_ratio:
        if old_policy in ("sft", "refresh_at_start", None):
            msg += "; high at the end: the old policy is never refreshed, so the policy drifts out of the clip range"
            fixes.append("grpo.old_policy=refresh_each_epoch")
        else:
            msg += "; high at the end although the old policy is refreshed every epoch: each epoch moves too far"
        fixes.append("a lower grpo.lr, or grpo.eps_high=0.28 (clip-higher)")
    return Finding(name, True, value, th.clip_ratio, msg + " -> updates throttled", " or ".join(dict.fromkeys(fixes)))


def check_zero_std(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "zero_std_groups"
    frac = _col(_rows(df, "grpo", "train"), "frac_reward_zero_std")
    if frac.empty:
        return _skip(name, "no GRPO train rows with frac_reward_zero_std", th.zero_std_frac)
    value = float(frac.mean())
    msg = (f"mean share of groups with no reward spread (advantage 0, no signal) {value:.1%} over {len(frac)} GRPO "
           f"steps (max {float(frac.max()):.1%})")
    if value <= th.zero_std_frac:
        return Finding(name, False, value, th.zero_std_frac, msg, "")
    dropped = _get(config, "grpo.drop_zero_std_groups")
    fix = "data reward weights (rewards that tie within a group carry no ranking signal)"
    if dropped is not True:
        fix = "grpo.drop_zero_std_groups=true (stop them diluting the loss), and " + fix
    else:
        msg += " (already dropped from the loss, but those queries teach GRPO nothing)"
    return Finding(name, True, value, th.zero_std_frac, msg, fix)


def check_kl_growth(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "kl_growth"
    series = _val_series(_rows(df, "grpo", "val"), "kl_to_sft")
    what = "KL(policy || SFT) on val"
    train_kl = _epoch_means(_rows(df, "grpo", "train"), "kl")
    if len(series) < 2:  # fall back on the penalty's own KL (against its reference, per training epoch)
        series, what = train_kl, "penalty KL (train, epoch means, against its own reference)"
    if len(series) < 2:
        return _skip(name, "needs KL at two or more GRPO epochs (val kl_to_sft or train kl)", th.kl_high)
    n = len(series) - 1
    j = min(max(round(n * 2 / 3), 0), n - 1)  # the point a third of the way back from the end
    start, end, mid = float(series.iloc[0]), float(series.iloc[-1]), float(series.iloc[j])
    rise_frac = (end - mid) / end if end > 0 else 0.0
    msg = (f"{what}: {_g(start)} -> {_g(end)} nats over GRPO; since epoch {series.index[j]} it rose by "
           f"{_g(end - mid)} ({rise_frac:.0%} of its final value; 'still climbing' from {th.kl_still_rising:.0%})")
    triggered = end >= th.kl_high and rise_frac >= th.kl_still_rising
    if what.startswith("KL(policy") and len(train_kl) >= 2:
        msg += f"; the penalty's own KL went {_g(float(train_kl.iloc[0]))} -> {_g(float(train_kl.iloc[-1]))}"
    if not triggered:
        return Finding(name, False, end, th.kl_high, msg, "")
    ref, old_policy = _get(config, "grpo.kl_reference"), _get(config, "grpo.old_policy")
    beta = _get(config, "grpo.kl_beta")
    if ref == "old" and old_policy in ("refresh_at_start", "refresh_each_epoch"):
        msg += "; the penalty measures KL to the refreshed old policy, so it does not anchor to SFT"
        fix = "grpo.kl_reference=sft"
    elif ref in ("old", None):
        fix = "grpo.kl_reference=sft, or a larger grpo.kl_beta" + (f" (now {_g(float(beta))})" if beta is not None
                                                                  else "")
    else:
        fix = f"a larger grpo.kl_beta (now {_g(float(beta)) if beta is not None else '?'}), a lower grpo.lr or " \
              f"fewer grpo.epochs"
    return Finding(name, True, end, th.kl_high, msg + " -> growing without bound", fix)


def check_kl_pinned(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "kl_pinned"
    kl = _col(_rows(df, "grpo", "train"), "kl")
    beta = _get(config, "grpo.kl_beta")
    if kl.empty:
        return _skip(name, "no GRPO train rows with kl", th.kl_pinned)
    value = float(kl.mean())
    msg = f"mean penalty KL over {len(kl)} GRPO steps {_g(value)} nats (max {_g(float(kl.max()))})"
    if beta is not None:
        msg += f", kl_beta {_g(float(beta))}"
    off = beta is not None and float(beta) == 0.0
    if value >= th.kl_pinned and not off:
        return Finding(name, False, value, th.kl_pinned, msg, "")
    if off:
        return Finding(name, True, value, th.kl_pinned, msg + " -> kl_beta=0: the KL term is switched off",
                       "grpo.kl_beta=0.1 (with grpo.kl_reference=sft to anchor to SFT)")
    # Two ways to sit at 0: the reference follows the policy (a refreshed old policy), or the policy never moves.
    drift = _val_series(_rows(df, "grpo", "val"), "kl_to_sft")
    if len(drift) and float(drift.iloc[-1]) < th.kl_pinned:
        return Finding(name, True, value, th.kl_pinned,
                       msg + f" -> pinned at ~0, and the policy ended only {_g(float(drift.iloc[-1]))} nats from "
                       f"SFT: GRPO barely moved it", "a larger grpo.lr or more grpo.epochs")
    ref = _get(config, "grpo.kl_reference")
    fix = "grpo.kl_reference=sft" if ref != "sft" else "check that the reference is the SFT model"
    return Finding(name, True, value, th.kl_pinned,
                   msg + " -> pinned at ~0: the KL term does nothing (its reference moves with the policy)", fix)


def check_entropy(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "entropy_collapse"
    series, what = _val_series(_rows(df, "grpo", "val"), "entropy"), "val entropy"
    if len(series) < 2:
        series, what = _epoch_means(_rows(df, "grpo", "train"), "entropy"), "train entropy (epoch means)"
    if len(series) < 2:
        return _skip(name, "needs entropy at two or more GRPO points (val or train)", th.entropy_drop)
    start, end = float(series.iloc[0]), float(series.iloc[-1])
    if not start > 0:
        return _skip(name, f"GRPO starts at entropy {_g(start)}: no relative drop to measure", th.entropy_drop)
    drop = (start - end) / start
    msg = f"{what}: {_g(start)} -> {_g(end)} nats over GRPO, a {drop:.1%} drop"
    if drop <= th.entropy_drop:
        return Finding(name, False, drop, th.entropy_drop, msg, "")
    return Finding(name, True, drop, th.entropy_drop, msg + " -> entropy collapse",
                   "grpo.eps_high=0.28 (DAPO clip-higher), or grpo.kl_reference=sft with a larger grpo.kl_beta, "
                   "or a lower grpo.lr")


_LABEL_METRICS = ("acc@1", "mrr", "utility@1")


def _changes(a: pd.Series, b: pd.Series) -> dict[str, tuple[float, float, float]]:
    """metric -> (before, after, relative change) for the metrics both rows have."""
    out = {}
    for m in ("reward@1", *_LABEL_METRICS):
        if m in a.index and m in b.index and pd.notna(a[m]) and pd.notna(b[m]) and a[m] != 0:
            out[m] = (float(a[m]), float(b[m]), (float(b[m]) - float(a[m])) / abs(float(a[m])))
    return out


def check_reward_vs_label(df: pd.DataFrame, config: dict[str, Any], th: Thresholds) -> Finding:
    name = "reward_vs_label"
    grpo_val, rce_val = _rows(df, "grpo", "val"), _rows(df, "rce", "val")
    if "reward@1" not in grpo_val.columns or len(grpo_val.dropna(subset=["reward@1"])) < 2:
        return _skip(name, "needs reward@1 at the GRPO start and end (val rows)", th.label_drop)
    grpo_val = grpo_val.dropna(subset=["reward@1"])
    end = grpo_val.iloc[-1]
    windows = [("GRPO start -> end", grpo_val.iloc[0])]
    sft_rows = rce_val[rce_val["epoch"] == 0] if "epoch" in rce_val.columns else rce_val.iloc[0:0]
    rce_epochs = _val_series(rce_val, "reward@1")
    if len(sft_rows) and len(rce_epochs) > 1:  # with RCE the SFT baseline differs from the GRPO start
        windows.insert(0, ("SFT -> GRPO end", sft_rows.iloc[-1]))
    parts, hits, drops_all, names = [], [], [], set()
    for label, start in windows:
        ch = _changes(start, end)
        if "reward@1" not in ch or not any(m in ch for m in _LABEL_METRICS):
            continue
        desc = ", ".join(f"{m}{' (hidden truth)' if m == 'utility@1' else ''} {_g(a)}->{_g(b)} ({r:+.1%})"
                         for m, (a, b, r) in ch.items())
        drop = max(-r for m, (_, _, r) in ch.items() if m != "reward@1")  # largest relative fall of a label metric
        fallen = [m for m, (_, _, r) in ch.items() if m != "reward@1" and -r > th.label_drop]
        hit = ch["reward@1"][2] > th.reward_rise and bool(fallen)
        drops_all.append(drop)
        if hit:
            hits.append(drop)
            names.update(fallen)
        parts.append(f"{label}: {desc}" + (f" [reward up, {'/'.join(fallen)} down]" if hit else ""))
    if not parts:
        return _skip(name, "no label metric (acc@1 / mrr / utility@1) next to reward@1", th.label_drop)
    msg = "; ".join(parts) + (f" (reward rise > {th.reward_rise:.1%} with a label fall > {th.label_drop:.1%} "
                              f"flags)")
    if not hits:
        return Finding(name, False, max(drops_all), th.label_drop, msg, "")
    return Finding(name, True, max(hits), th.label_drop,
                   msg + f" -> 'worse' depends on the metric: the reward disagrees with "
                   f"{'/'.join(m for m in _LABEL_METRICS if m in names)}",
                   "data reward weights (make the reward agree with the labels), or rce.label_weight=0.5 to keep "
                   "the labels in the targets; judge runs by the metric you ship")


def _rce_fixed_temperature_losses(run_dir: Path, config: dict[str, Any]) -> dict[int, float] | None:
    """epoch -> RCE loss on the training split of the policy after that RCE epoch (0 = ``sft.pt``), for the first
    and the last two epochs, all at the *final* temperature; None when the run dir lacks what that needs.

    The logged loss is ``H(targets_T) + KL(targets_T || policy)``, and annealing T sharpens the targets, lowering
    ``H`` with no learning at all. Holding T fixed leaves only what the policy learnt.
    """
    from .checkpoint import epoch_checkpoints, load_checkpoint, model_from_checkpoint
    from .config import from_dict, RunConfig
    from .losses import rce_targets
    from .model import compute_log_probs
    from .pipeline import prepare_data

    ckpts = dict(epoch_checkpoints(run_dir, "rce"))
    if (run_dir / "sft.pt").is_file():
        ckpts.setdefault(0, run_dir / "sft.pt")
    if len(ckpts) < 2 or not config:
        return None
    epochs = sorted({min(ckpts), *sorted(ckpts)[-2:]})
    cfg = from_dict(RunConfig, config)
    train = prepare_data(cfg).train
    rce = cfg.rce
    losses = {}
    for e in epochs:
        ckpt = load_checkpoint(ckpts[e])
        model = model_from_checkpoint(ckpt, ckpts[e])
        sim_t = float(ckpt["model_config"]["sim_temperature"])
        if rce.temperature_target == "rewards":
            reward_t, logit_t = rce.t_end, sim_t
        else:
            reward_t, logit_t = rce.reward_temperature, sim_t * rce.t_end
        logp = compute_log_probs(model, train, logit_t)
        t = rce_targets(train.labels, train.rewards, reward_t, mask=train.mask, label_weight=rce.label_weight)
        losses[e] = float(-(t * logp).masked_fill(~train.mask, 0.0).sum(1).mean())
    return losses


def _rce_logged_fall(rce: pd.DataFrame, loss: pd.Series) -> tuple[float, float, str, str] | None:
    """(previous, last, description, temperature note) of the logged RCE loss."""
    temps = _epoch_means(rce, "temperature")
    if len(loss) >= 2:
        prev, last = float(loss.iloc[-2]), float(loss.iloc[-1])
        where = f"logged RCE loss, epoch {loss.index[-2]} -> {loss.index[-1]} means"
        t_prev, t_last = ((float(temps.iloc[-2]), float(temps.iloc[-1])) if len(temps) >= 2 else (None, None))
    else:  # one epoch: its first half against its second half
        steps = rce.dropna(subset=["loss"])
        half = len(steps) // 2
        if half < 1:
            return None
        prev, last = float(steps["loss"].iloc[:half].mean()), float(steps["loss"].iloc[half:].mean())
        where = "logged RCE loss, first -> second half of the only RCE epoch"
        t = _col(steps, "temperature")
        t_prev, t_last = ((float(t.iloc[:half].mean()), float(t.iloc[half:].mean())) if len(t) == len(steps)
                          else (None, None))
    note = ""
    if t_prev is not None and not math.isclose(t_prev, t_last, rel_tol=1e-3):
        note = f"temperature {_g(t_prev)} -> {_g(t_last)}"
    return prev, last, where, note


def check_rce_converged(df: pd.DataFrame, config: dict[str, Any], th: Thresholds,
                        run_dir: Path | None = None) -> Finding:
    name = "rce_converged"
    rce = _rows(df, "rce", "train")
    loss = _epoch_means(rce, "loss")
    if loss.empty:
        epochs = _get(config, "rce.epochs")
        why = "no RCE steps" + (f" (rce.epochs={epochs}): GRPO started from SFT" if epochs is not None else "")
        return _skip(name, why, th.rce_still_falling)
    logged = _rce_logged_fall(rce, loss)
    fixed, logged_note = None, ""
    if run_dir is not None:
        try:
            fixed = _rce_fixed_temperature_losses(run_dir, config)
        except Exception as e:  # noqa: BLE001 - any failure (moved data file, old checkpoint) falls back on the log
            logged_note = f" (could not re-score the RCE checkpoints: {type(e).__name__}: {e})"
    pace = None
    if fixed is not None:
        e_first, e_prev, e_last = min(fixed), sorted(fixed)[-2], max(fixed)
        prev, last = fixed[e_prev], fixed[e_last]
        fall = (prev - last) / prev if prev > 0 else 0.0
        t_end = _get(config, "rce.t_end")
        msg = (f"RCE loss on the training split at the final temperature (T={_g(float(t_end))}), policy after epoch "
               f"{e_prev} -> after epoch {e_last}: {_g(prev)} -> {_g(last)}, a {fall:.1%} fall")
        total = fixed[e_first] - last
        if e_first == 0 and e_last >= 2 and total > 0:
            # Scale-free: a tiny lr makes every epoch's fall small, but a curve that has not flattened still makes
            # its last epoch as large as its average one.
            pace = (prev - last) / (total / e_last)
            msg += (f"; the last epoch gained {pace:.2f}x RCE's average per-epoch gain ({_g(fixed[e_first])} at "
                    f"SFT; 'not flattened' from {th.rce_pace:.2f}x)")
        if logged is not None:
            lp, ll, _, note = logged
            logged_fall = (lp - ll) / lp if lp > 0 else 0.0
            msg += f"; the logged loss fell {logged_fall:.1%}"
            if note and logged_fall > 2 * fall:  # the gap between the two is the schedule, not learning
                msg += f" with the {note}, most of it the targets sharpening, not learning"
    elif logged is not None:
        prev, last, where, note = logged
        if not prev > 0:
            return _skip(name, f"RCE loss {_g(prev)} is not positive: no relative change", th.rce_still_falling)
        fall = (prev - last) / prev
        msg = f"{where}: {_g(prev)} -> {_g(last)}, a {fall:.1%} fall{logged_note}"
        if note:
            # The target temperature anneals, and sharper targets have lower entropy: part of the fall is the schedule.
            msg += (f" ({note} between them: sharper targets lower the loss without any learning, so this overstates "
                    f"it; run the doctor on the run dir, with its checkpoints, for the fixed-temperature comparison)")
    else:
        return _skip(name, "a single RCE step: nothing to compare", th.rce_still_falling)
    moved = _val_series(_rows(df, "rce", "val"), "kl_to_sft")
    if len(moved):
        msg += f"; RCE moved the policy {_g(float(moved.iloc[-1]))} nats (KL) from SFT"
    n = _get(config, "rce.epochs")
    n = int(n) if n is not None else len(loss)
    more = f"rce.epochs={max(5, 2 * n)} (more RCE), or a larger rce.lr"
    if fall > th.rce_still_falling:
        return Finding(name, True, fall, th.rce_still_falling, msg + " -> RCE had not converged before GRPO", more)
    if pace is not None and pace >= th.rce_pace:
        return Finding(name, True, pace, th.rce_pace,
                       msg + " -> RCE loss still falling at an undiminished pace: the curve has not flattened", more)
    return Finding(name, False, fall, th.rce_still_falling, msg, "")


_CHECK_FNS = (check_step0_ratio, check_clip_ratio, check_zero_std, check_kl_growth, check_kl_pinned, check_entropy,
              check_reward_vs_label, check_rce_converged)


# ---------------------------------------------------------------- public API

def diagnose(
    run: str | Path | pd.DataFrame,
    config: dict[str, Any] | None = None,
    thresholds: Thresholds | None = None,
) -> list[Finding]:
    """Every check on a run dir (reads ``metrics.csv`` and ``config.yaml``) or on a metrics frame.

    ``config`` (nested dict as in ``config.yaml``, or a ``RunConfig``) overrides the run dir's; without one the
    checks still run, but cause attribution and some suggestions are less specific.
    """
    th = thresholds or Thresholds()
    if isinstance(run, pd.DataFrame):
        df, file_cfg, run_dir = run, {}, None
    else:
        df, file_cfg = load_run(run)
        run_dir = Path(run)
    if config is not None and dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    cfg = file_cfg if config is None else config
    findings = []
    for fn, check in zip(_CHECK_FNS, _CHECKS):
        try:
            extra = {"run_dir": run_dir} if fn is check_rce_converged else {}
            findings.append(fn(df, cfg, th, **extra))
        except (KeyError, ValueError, TypeError, IndexError) as e:  # malformed input: report, never crash
            findings.append(_skip(check, f"could not evaluate ({type(e).__name__}: {e})"))
    return findings


def report_frame(findings: Iterable[Finding]) -> pd.DataFrame:
    """One row per finding; columns as the :class:`Finding` fields."""
    cols = [f.name for f in dataclasses.fields(Finding)]
    return pd.DataFrame([dataclasses.asdict(f) for f in findings], columns=cols)


def format_report(findings: Iterable[Finding], title: str | None = None) -> str:
    """Readable text: one line per check (⚠ flagged, ✔ fine, – skipped) with its number and threshold, then the
    suggested switch under each flagged check."""
    findings = list(findings)
    width = max((len(f.check) for f in findings), default=0)
    lines = [title or "GRPO health report"]
    for f in findings:
        mark = "⚠" if f.triggered else ("–" if f.value is None else "✔")
        num = "" if f.value is None else f"value {_g(f.value)}"
        if f.threshold is not None and f.value is not None:
            num += f" (threshold {_g(f.threshold)})"
        lines.append(f"{mark} {f.check:<{width}}  {num}".rstrip())
        lines.append(f"    {f.message}")
        if f.triggered and f.suggestion:
            lines.append(f"    -> try: {f.suggestion}")
    flagged = [f.check for f in findings if f.triggered]
    skipped = sum(f.value is None and not f.triggered for f in findings)
    summary = f"{len(flagged)} of {len(findings)} checks flagged" + (f": {', '.join(flagged)}" if flagged else "")
    lines.append(summary + (f"; {skipped} skipped" if skipped else ""))
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    findings = diagnose(run)
    print(format_report(findings, title=f"GRPO health report: {run}"))
    if args.csv:
        atomic_write_frame(args.csv, report_frame(findings))
    return 0


def register_cli(subparsers: Any) -> None:
    """``v3kit doctor RUN_DIR``: the GRPO health report of a finished (or partial) run."""
    p = subparsers.add_parser("doctor", help="GRPO health report of a run dir: what looks wrong and what to switch")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir written by `v3kit run` (holds metrics.csv)")
    p.add_argument("--csv", metavar="PATH", help="also save the findings as a table")
    p.set_defaults(func=cmd_doctor)
