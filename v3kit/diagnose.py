"""GRPO health report ("doctor"): read a run's ``metrics.csv`` (and ``config.yaml``) and check the symptoms of
the suspects in ``docs/pipeline.md`` ("Why GRPO might underperform"), each with the number behind it and a switch to try.

Each check is one function registered with ``@check(name)``; they run in registration order (``check_names()``):

* ``step0_ratio``: the PPO ratio at GRPO step 0 is not ~1 (stale old policy or temperature mismatch).
* ``clip_ratio``: the clip removes the gradient of many entries for long stretches (updates throttled).
* ``zero_std_groups``: many groups have no reward spread, hence zero advantage (no signal).
* ``kl_growth``: KL to the SFT model still climbing at the end of GRPO and already large (nothing anchors it).
* ``kl_pinned``: the KL penalty is ~0 throughout (the KL term does nothing).
* ``entropy_collapse``: the policy's entropy fell by a large fraction during GRPO.
* ``reward_vs_label``: the reward of the top pick rose (read off regret@1, so no constant shift or scaling of the
  reward changes the verdict) while label metrics (acc@1, mrr; utility@1 where the data knows it) fell.
* ``rce_converged``: did RCE move the policy (KL to SFT) and is it still closing its gap to the loss floor
  H(targets)? Says "lr too small to move the policy" when it barely moved. Reads ``metrics.csv`` and the data only,
  so a full run and an ablation folder without per-epoch checkpoints get the same verdict.
* ``reward_shortcut``: the share of within-group reward variance that candidate features alone explain (the part
  of the reward any query would give; ``v3kit/shortcut.py``), and what the policy's change from SFT followed.
* ``rce_targets``: how concentrated RCE's targets are at t_start and t_end (the temperature is in reward units
  unless ``rce.reward_norm`` normalises per group).
* ``baselines``: SFT against random, raw-feature cosine and the reward's argmax (``v3kit/baselines.py``).

The last three (and RCE's loss floor) need the data: on a run dir it is rebuilt from ``config.yaml``; on a bare frame
pass ``splits=`` or they are skipped. None of them needs a true utility.

Every flagged finding carries ``switches``: the config overrides to *test*. ``v3kit doctor RUN --grid`` writes
``RUN/doctor_grid.yaml``, an ablation of those switches against the run itself (see ``doctor_grid.py``).

A check whose stage or columns are missing is reported as skipped (``triggered=False``, ``value=None``) with the
reason; the doctor never fails on a partial run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

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
    # The config overrides behind the suggestion, one variant each, that ``doctor --grid`` puts in a grid to test
    # against the run itself (only rce.* / grpo.* switches: an ablation shares the run's data, model and SFT).
    switches: list[str] = field(default_factory=list)


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
    # ... above this (nats) = exploding: 1 nat means the policy's log-probs sit, on average, a factor e from the
    # penalty's reference; a KL between two distributions over a group of 8 has that scale only when one of them
    # has nearly left the other's support (the uniform group's whole entropy is log 8 = 2.1 nats). A sampled
    # estimator (k3 = ratio - 1 - log ratio) grows like the ratio itself, so a stale old policy makes it explode.
    kl_explode: float = 1.0
    # Relative entropy drop from SFT's entropy to GRPO's end (SFT is what the run started from: an RCE warm-up
    # that raised the entropy, followed by GRPO bringing it back, is no collapse): losing a quarter of it is the
    # collapse DAPO's clip-higher was introduced against.
    entropy_drop: float = 0.25
    # The top pick's reward must gain more than this share of its regret (regret@1 = best reward in the group minus
    # the top pick's: its relative fall is the same for any shift or positive scaling of the reward) ...
    reward_rise: float = 0.005
    # ... while acc@1, mrr or utility@1 fall by more than this (relative; 1% of acc@1 ~ 0.36 on the default
    # 450-query val split is ~2 queries, so smaller moves are noise of a single run).
    label_drop: float = 0.01
    # RCE, judged by how far it moved the policy and how much of its gap to the loss floor it closed (the floor is
    # H(targets), the entropy of RCE's own targets: loss - H(targets) = KL(targets || policy) is all it can learn).
    # "lr too small to move the policy": KL(RCE policy || SFT) below this (nats; 0.7% of the ~1.4 nats entropy of
    # the default SFT policy over 8 candidates; the seed's RCE at lr 1e-5 moves it ~0.003, at lr 1e-3 ~0.06) ...
    rce_min_kl: float = 1e-2
    # ... and less than this share of SFT's gap to the floor closed by the end of RCE (at lr 1e-3 RCE closes ~1/3).
    rce_min_closed: float = 0.2
    # The last RCE epoch still closed at least this share of the starting gap: another epoch would close more.
    rce_still_closing: float = 0.05
    # Without the data to compute the floor: relative fall of the epoch-mean logged loss, previous -> last epoch.
    rce_still_falling: float = 0.05
    # Share of the within-group reward variance that the candidate features alone explain (cross-fitted, see
    # v3kit/shortcut.py): with no shortcut it is ~0 (the default synthetic world with reward_bias=0 gives < 1%);
    # 5% means a visible slice of what GRPO is paid for needs no reading of the query.
    shortcut_share: float = 0.05
    # RCE target concentration: a group is "effectively one-hot" when its top target weight is at least this; when
    # that holds for this share of groups at t_end, RCE is plain cross-entropy on the reward's argmax there and the
    # temperature schedule says more about the reward's scale than about the intended softness.
    one_hot_weight: float = 0.95
    one_hot_share: float = 0.5
    # A reward de-biasing is suggested only if the val reward-label agreement after it is at most this much below
    # the agreement before (one group in 100): removing a pure shortcut leaves the agreement where it was or
    # raises it, while an estimate that carries label signal lowers it.
    debias_agreement_drop: float = 0.01


_Check = Callable[["RunContext"], Finding]
_REGISTRY: dict[str, _Check] = {}


def check(name: str) -> Callable[[_Check], _Check]:
    """Register a doctor check under ``name``; :func:`diagnose` runs them in registration order."""
    def register(fn: _Check) -> _Check:
        if name in _REGISTRY:
            raise ValueError(f"doctor check {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn
    return register


def check_names() -> list[str]:
    """The registered checks, in report order."""
    return list(_REGISTRY)


@dataclass
class RunContext:
    """What a check reads: the metrics frame, the config, the thresholds and, for a run dir, its data and
    checkpoints (loaded lazily, once, by the checks that need them)."""

    df: pd.DataFrame
    config: dict[str, Any]
    th: Thresholds
    run_dir: Path | None = None
    splits: Any = None  # v3kit.data.Splits given by the caller (else built from the config of a run dir)
    sft: Any = None  # (SFT model, its sim_temperature) given by the caller (else the run dir's SFT checkpoint)
    _cache: dict[str, Any] = field(default_factory=dict)

    def sft_model(self) -> tuple[Any, float] | None:
        """(the SFT model, its logit temperature), or None: from the caller, else the run dir's ``sft.pt`` or the
        SFT checkpoint ``run_info.json`` records (ablation folders keep that one; only per-epoch ones go)."""
        if self.sft is None and "sft" not in self._cache:
            self._cache["sft"] = None
            if self.run_dir is not None:
                from .checkpoint import load_checkpoint, model_from_checkpoint
                from .pipeline import recorded_sft_checkpoint
                path = recorded_sft_checkpoint(self.run_dir) or self.run_dir / "sft.pt"
                if Path(path).is_file():
                    try:
                        ckpt = load_checkpoint(path)
                        self._cache["sft"] = (model_from_checkpoint(ckpt, path),
                                              float(ckpt["model_config"]["sim_temperature"]))
                    except Exception:  # noqa: BLE001 - an unreadable checkpoint costs those numbers only
                        self._cache["sft"] = None
        return self.sft if self.sft is not None else self._cache["sft"]

    def data(self) -> Any:
        """The run's :class:`Splits`, or None (a bare frame, or data that cannot be rebuilt)."""
        if self.splits is None and "splits" not in self._cache:
            self._cache["splits"] = None
            if self.run_dir is not None and self.config:
                from .config import RunConfig, from_dict
                from .pipeline import prepare_data, recorded_split_seed
                try:
                    cfg = from_dict(RunConfig, self.config)
                    split_seed = recorded_split_seed(self.run_dir)  # ablation runs use the shared SFT's split
                    if split_seed is not None:
                        cfg = dataclasses.replace(cfg, seed=split_seed)
                    self._cache["splits"] = prepare_data(cfg)
                except Exception as e:  # noqa: BLE001 - a moved data file costs the data checks, not the report
                    self._cache["data_error"] = f"{type(e).__name__}: {e}"
        return self.splits if self.splits is not None else self._cache["splits"]

    def data_missing(self) -> str:
        """Why :meth:`data` is None, for a skip message."""
        if "data_error" in self._cache:
            return f"could not rebuild the run's data ({self._cache['data_error']})"
        return "needs the run's data: run the doctor on a run dir (with its config.yaml)"


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


_SWITCH = re.compile(r"\b(?:rce|grpo|reward|model|sft)\.[a-z_]+=[^\s,;()]+")


def switch_tokens(text: str) -> list[str]:
    """The ``rce.*=`` / ``grpo.*=`` / ``reward.*=`` / ``model.*=`` / ``sft.*=`` overrides written in a suggestion,
    in order, once each (each one variant of an ablation against the run)."""
    return list(dict.fromkeys(_SWITCH.findall(text)))


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


@check("step0_ratio")
def check_step0_ratio(ctx: RunContext) -> Finding:
    df, config, th = ctx.df, ctx.config, ctx.th
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
        if _get(config, "grpo.kl_reference") in ("old", None):
            # The stale SFT old policy is also the run's only anchor: the clip and the KL both hold GRPO near SFT.
            # Refreshing alone removes that trust region, so test it with the KL moved onto SFT.
            causes.append("but that stale SFT old policy is also the run's trust region (clip and KL both measure "
                          "against SFT), so refresh only with the KL anchored to SFT")
            fixes.append("grpo.old_policy=refresh_at_start grpo.kl_reference=sft")
        else:
            fixes.append("grpo.old_policy=refresh_at_start")
    if mismatch:
        causes.append(mismatch)
        sim_t = _get(config, "model.sim_temperature")
        fixes.append(f"grpo.logp_temperature={_g(float(sim_t))}")
        if not any(f.startswith("grpo.old_policy=refresh_at_start") for f in fixes):
            fixes.append("grpo.old_policy=refresh_at_start")
    if not causes:
        causes.append("stale old policy or logit-temperature mismatch" + (" (no config to tell which)"
                                                                          if not config else ""))
        fixes += ["grpo.old_policy=refresh_at_start", "check grpo.logp_temperature against model.sim_temperature"]
    switches = [f for f in fixes if "=" in f and not f.startswith("check ")]
    return Finding(name, True, value, threshold, f"{msg}. Likely cause: {'; '.join(causes)}", " or ".join(fixes),
                   switches)


def _window_mean(values: pd.Series, frac: float, last: bool) -> float:
    k = max(1, math.ceil(len(values) * frac))
    part = values.iloc[-k:] if last else values.iloc[:k]
    return float(part.mean())


@check("clip_ratio")
def check_clip_ratio(ctx: RunContext) -> Finding:
    df, config, th = ctx.df, ctx.config, ctx.th
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
        fixes.append("a lower grpo.lr, or grpo.eps_high=0.28 (clip-higher), or grpo.loss_type=cispo (clipped "
                     "entries keep a gradient)")
    return Finding(name, True, value, th.clip_ratio, msg + " -> updates throttled", " or ".join(dict.fromkeys(fixes)))


@check("zero_std_groups")
def check_zero_std(ctx: RunContext) -> Finding:
    df, config, th = ctx.df, ctx.config, ctx.th
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


@check("kl_growth")
def check_kl_growth(ctx: RunContext) -> Finding:
    df, config, th = ctx.df, ctx.config, ctx.th
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
    change = f"rose by {_g(end - mid)}" if end >= mid else f"fell by {_g(mid - end)}"
    msg = (f"{what}: {_g(start)} -> {_g(end)} nats over GRPO; since epoch {series.index[j]} it {change} "
           f"({rise_frac:+.0%} of its final value; 'still climbing' from {th.kl_still_rising:.0%})")
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


@check("kl_pinned")
def check_kl_pinned(ctx: RunContext) -> Finding:
    df, config, th = ctx.df, ctx.config, ctx.th
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
    if value > th.kl_explode and not off:
        est = _get(config, "grpo.kl_estimator")
        fixes = []
        if est != "exact":
            fixes.append("grpo.kl_estimator=exact")  # the whole-group KL is bounded by the policies, not the ratio
        if _get(config, "grpo.old_policy") == "sft" and (_get(config, "rce.epochs") or 0) > 0:
            fixes.append("grpo.old_policy=refresh_at_start grpo.kl_reference=sft")
        return Finding(name, True, value, th.kl_explode,
                       msg + f" -> the KL penalty explodes (mean above {_g(th.kl_explode)} nats): its estimate follows "
                       "the PPO ratio, so a policy far from the penalty's reference makes the KL term, not the "
                       "reward, drive the updates", " or ".join(fixes) or "a lower grpo.lr",
                       fixes or [])
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


@check("entropy_collapse")
def check_entropy(ctx: RunContext) -> Finding:
    df, th = ctx.df, ctx.th
    name = "entropy_collapse"
    series, what = _val_series(_rows(df, "grpo", "val"), "entropy"), "val entropy"
    if len(series) < 2:
        series, what = _epoch_means(_rows(df, "grpo", "train"), "entropy"), "train entropy (epoch means)"
    if len(series) < 2:
        return _skip(name, "needs entropy at two or more GRPO points (val or train)", th.entropy_drop)
    start, end = float(series.iloc[0]), float(series.iloc[-1])
    sft_h = _val_series(_rows(df, "rce", "val"), "entropy")
    sft_start = float(sft_h.iloc[0]) if len(sft_h) and 0 in sft_h.index and what == "val entropy" else None
    ref, ref_name = (sft_start, "SFT") if sft_start is not None else (start, "the GRPO start")
    if not ref > 0:
        return _skip(name, f"{ref_name} has entropy {_g(ref)}: no relative drop to measure", th.entropy_drop)
    drop = (ref - end) / ref
    msg = f"{what}: {_g(start)} -> {_g(end)} nats over GRPO"
    if sft_start is not None:
        msg += f" (SFT: {_g(sft_start)})"
    msg += f", {abs(drop):.1%} {'below' if drop >= 0 else 'above'} {ref_name}'s"
    if drop <= th.entropy_drop:
        return Finding(name, False, drop, th.entropy_drop, msg, "")
    return Finding(name, True, drop, th.entropy_drop, msg + " -> entropy collapse",
                   "grpo.eps_high=0.28 (DAPO clip-higher), or grpo.entropy_coef=0.01 (entropy bonus), or "
                   "grpo.kl_reference=sft with a larger grpo.kl_beta, or a lower grpo.lr")


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
        return f"regret@1 {_g(r[0])}->{_g(r[1])} ({how} of the regret)", -r[2]
    r = _rel(a, b, "ndcg@5")
    if r is not None:
        return f"ndcg@5 {_g(r[0])}->{_g(r[1])} ({r[2]:+.1%})", r[2]
    return None


def _disagreement(ctx: RunContext) -> str:
    """The share of held-out groups whose highest-reward candidate is not the label (needs the data)."""
    splits = ctx.data()
    if splits is None:
        return ""
    from .reward_stats import label_reward_agreement
    return (f"; the reward's top candidate is not the label in {1 - label_reward_agreement(splits.val):.0%} of the "
            f"val groups")


@check("reward_vs_label")
def check_reward_vs_label(ctx: RunContext) -> Finding:
    """Reward up while a label metric falls. The reward side is read off regret@1 (or ndcg@5), so the verdict does
    not depend on the reward's offset or scale; label metrics are relative changes of acc@1 / mrr (/ utility@1
    where the data has a true utility)."""
    df, th, name = ctx.df, ctx.th, "reward_vs_label"
    grpo_val, rce_val = _rows(df, "grpo", "val"), _rows(df, "rce", "val")
    if len(grpo_val) < 2:
        return _skip(name, "needs val rows at the GRPO start and end", th.label_drop)
    end = grpo_val.iloc[-1]
    windows = [("GRPO start -> end", grpo_val.iloc[0])]
    sft_rows = rce_val[rce_val["epoch"] == 0] if "epoch" in rce_val.columns else rce_val.iloc[0:0]
    if len(sft_rows) and len(_val_series(rce_val, "acc@1")) > 1:  # with RCE the SFT baseline differs
        windows.insert(0, ("SFT -> GRPO end", sft_rows.iloc[-1]))
    parts, hits, drops_all, names = [], [], [], set()
    for label, start in windows:
        gain = _reward_gain(start, end)
        ch = {m: r for m in _LABEL_METRICS if (r := _rel(start, end, m)) is not None}
        if gain is None or not ch:
            continue
        desc = ", ".join(f"{m}{' (hidden truth)' if m == 'utility@1' else ''} {_g(a)}->{_g(b)} ({r:+.1%})"
                         for m, (a, b, r) in ch.items())
        drop = max(-r for (_, _, r) in ch.values())  # largest relative fall of a label metric
        fallen = [m for m, (_, _, r) in ch.items() if -r > th.label_drop]
        hit = gain[1] > th.reward_rise and bool(fallen)
        drops_all.append(drop)
        if hit:
            hits.append(drop)
            names.update(fallen)
        parts.append(f"{label}: {gain[0]}, {desc}" + (f" [reward up, {'/'.join(fallen)} down]" if hit else ""))
    if not parts:
        return _skip(name, "needs regret@1 (or ndcg@5) and a label metric (acc@1 / mrr) at the GRPO start and end",
                     th.label_drop)
    msg = "; ".join(parts) + (f" (a reward gain > {th.reward_rise:.1%} with a label fall > {th.label_drop:.1%} "
                              f"flags){_disagreement(ctx)}")
    if not hits:
        return Finding(name, False, max(drops_all), th.label_drop, msg, "")
    return Finding(name, True, max(hits), th.label_drop,
                   msg + f" -> 'worse' depends on the metric: the reward disagrees with "
                   f"{'/'.join(m for m in _LABEL_METRICS if m in names)}",
                   "rce.label_weight=0.5 (keep the labels in the RCE targets), or fix the data's reward weights so "
                   "the reward agrees with the labels; judge runs by the metric you ship", ["rce.label_weight=0.5"])


def _rce_gaps(ctx: RunContext, rows: pd.DataFrame) -> tuple[pd.Series, pd.Series] | None:
    """Per logged RCE step: the loss floor H(targets) at that step's temperatures, and the gap the SFT policy has
    to that floor there, KL(targets || pi_SFT), both on the run's training split; None without data or SFT.

    The SFT gap is the yardstick: as the temperature anneals the targets sharpen, so both the floor and the gap of
    any fixed policy change; ``1 - (loss - floor) / gap_SFT`` is the share of the gap RCE closed at that temperature.
    """
    splits, sft = ctx.data(), ctx.sft_model()
    if splits is None or sft is None:
        return None
    from .losses import rce_targets
    from .model import compute_log_probs

    get = lambda k, d: d if _get(ctx.config, f"rce.{k}") is None else _get(ctx.config, f"rce.{k}")  # noqa: E731
    on_rewards = get("temperature_target", "rewards") == "rewards"
    fixed_t = float(get("reward_temperature", 1.0))
    label_weight, norm = float(get("label_weight", 0.0)), str(get("reward_norm", "none"))
    model, sim_t = sft
    train = splits.train
    if "temperature" not in rows.columns or rows["temperature"].isna().any():
        return None
    cache: dict[float, tuple[float, float]] = {}
    logp_cache: dict[float, Any] = {}

    def terms(t: float) -> tuple[float, float]:
        key = round(float(t), 4)
        if key not in cache:
            reward_t, logit_t = (key, sim_t) if on_rewards else (fixed_t, sim_t * key)
            if logit_t not in logp_cache:
                logp_cache[logit_t] = compute_log_probs(model, train, logit_t)
            logp = logp_cache[logit_t]
            tg = rce_targets(train.labels, train.rewards, reward_t, mask=train.mask, label_weight=label_weight,
                             reward_norm=norm)
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
    return (float(values.iloc[:half].mean()), float(values.iloc[half:].mean()),
            "first -> second half of the only RCE epoch")


@check("rce_converged")
def check_rce_converged(ctx: RunContext) -> Finding:
    """Did RCE move the policy, and has it stopped closing its gap to the loss floor?

    Judged from ``metrics.csv`` and the data alone (never the per-epoch checkpoints, which ablation folders delete),
    so a full run and its ablation copy get the same verdict: KL(RCE policy || SFT) from the val rows, and the
    logged loss minus its floor H(targets) at each step's temperature = KL(targets || policy), the part of the loss
    RCE can reduce (the raw loss also falls as the annealed temperature sharpens the targets, learning or not).
    At a tiny lr the progress per epoch is small but constant, so "the last epoch gained as much as the average"
    says nothing; what counts is how much of the starting gap was closed, and how far the policy moved.
    """
    df, config, th, name = ctx.df, ctx.config, ctx.th, "rce_converged"
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
        msg = (f"RCE loss above its floor H(targets), as a share of the SFT policy's gap KL(targets || SFT) at the "
               f"same temperatures ({unit}): RCE closed {closed_prev:.1%} of it by the previous window and "
               f"{closed_total:.1%} by the "
               f"last ({where}): {closed_last:+.1%} in the last window ('still closing' from "
               f"{th.rce_still_closing:.0%}; SFT's gap in the last window {_g(float(gap_sft[last_sel].mean()))} nats)")
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
            msg += (" (the annealed temperature sharpens the targets, which lowers the loss without any learning, so "
                    "this overstates it; on a run dir the doctor measures the loss above its floor H(targets))")
    if moved is not None:
        msg += f"; RCE moved the policy {_g(moved)} nats (KL to SFT, val)"
    if moved is not None and moved < th.rce_min_kl and (closed_total is None or closed_total < th.rce_min_closed):
        fix = f"rce.lr={10 * float(lr):g}" if lr is not None else "a 10x larger rce.lr"
        more = ""
        if closed_total is not None and closed_total > 0:
            more = f" (at this pace closing half the gap would take ~{0.5 * n / closed_total:.0f} epochs)"
        return Finding(name, True, moved, th.rce_min_kl,
                       msg + f" -> lr too small to move the policy: RCE left it about where SFT put it{more}; a larger "
                       f"lr is the test, not more epochs", fix, [fix] if lr is not None else [])
    more_epochs = f"rce.epochs={max(5, 2 * n)}"
    if closed_last is not None:
        if closed_last >= th.rce_still_closing:
            return Finding(name, True, closed_last, th.rce_still_closing,
                           msg + " -> RCE was still closing its gap to the floor when GRPO started",
                           more_epochs + " (more RCE)", [more_epochs])
        return Finding(name, False, closed_last, th.rce_still_closing, msg, "")
    if fall > th.rce_still_falling:
        return Finding(name, True, fall, th.rce_still_falling, msg + " -> RCE had not converged before GRPO",
                       more_epochs + " (more RCE)", [more_epochs])
    return Finding(name, False, fall, th.rce_still_falling, msg, "")


def _logit_change(ctx: RunContext, data: Any) -> tuple[Any, str] | None:
    """``log pi_final - log pi_SFT`` on ``data`` from the run dir's checkpoints (the last GRPO, else RCE, epoch
    against ``sft.pt`` or the recorded SFT checkpoint), and which policy it is; None when they are not there."""
    if ctx.run_dir is None:
        return None
    from .checkpoint import epoch_checkpoints, load_checkpoint, model_from_checkpoint
    from .model import compute_log_probs
    from .pipeline import recorded_sft_checkpoint

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
        logps.append(compute_log_probs(model_from_checkpoint(ckpt, p), data,
                                       float(ckpt["model_config"]["sim_temperature"])))
    return logps[0] - logps[1], f"{stage} epoch {epoch}"


@check("reward_shortcut")
def check_reward_shortcut(ctx: RunContext) -> Finding:
    """How much of the within-group reward any query would give the candidate (v3kit/shortcut.py), and, with the
    checkpoints, whether the policy's change from SFT followed that part rather than the label."""
    th, name = ctx.th, "reward_shortcut"
    splits = ctx.data()
    if splits is None:
        return _skip(name, ctx.data_missing(), th.shortcut_share)
    from .shortcut import reward_shortcut

    train = splits.train
    change = _logit_change(ctx, train)
    a = reward_shortcut(train, None if change is None else change[0])
    msg = (f"candidate features alone (cross-fitted ridge, {a.k_folds} folds of queries) explain "
           f"{a.explained_share:.1%} of the within-group reward variance on the training split; ranking by that query-independent part "
           f"alone gives acc@1 {a.acc_shortcut:.3f} (the reward's own argmax: {a.acc_reward:.3f})")
    if change is not None:
        msg += (f"; the policy's change of logits from SFT ({change[1]}) correlates {a.corr_change_shortcut:+.2f} with "
                f"the query-independent part, {a.corr_change_rest:+.2f} with the query-dependent rest and "
                f"{a.corr_change_label:+.2f} with the label")
    if not a.explained_share >= th.shortcut_share:
        return Finding(name, False, a.explained_share, th.shortcut_share, msg, "")
    followed = (change is not None and a.corr_change_shortcut is not None and a.corr_change_label is not None
                and a.corr_change_shortcut > a.corr_change_label)
    debias_msg, debias_switches = _debias_options(splits, ctx.th)
    switches = [*debias_switches, "rce.label_weight=0.5"]
    return Finding(name, True, a.explained_share, th.shortcut_share,
                   msg + " -> the reward pays for something in the candidate whatever the query" +
                   (", and the policy learnt that more than the label" if followed else "") + "; " + debias_msg,
                   " or ".join([*(f"{d} (de-bias the training rewards)" for d in debias_switches),
                                "rce.label_weight=0.5 (anchor the RCE targets to the labels)"]), switches)


def _debias_options(splits: Any, th: Thresholds) -> tuple[str, list[str]]:
    """Which reward de-biasing keeps the reward's label agreement on val (v3kit/debias.py): the methods that do,
    best first, as switches, and a sentence with both methods' numbers. A method that lowers the agreement by more
    than ``th.debias_agreement_drop`` is named as one *not* to use: its estimate carries label signal."""
    from .debias import DebiasError, RewardConfig, debias_report

    parts, keep = [], []
    for method in ("candidate_prior", "candidate_features"):
        try:
            _, rep = debias_report(method, splits, RewardConfig(debias=method))
        except DebiasError as e:
            parts.append(f"{method}: unavailable ({str(e).split(':')[0].replace('reward.debias=', '')})")
            continue
        ok = rep.agreement_after >= rep.agreement_before - th.debias_agreement_drop
        parts.append(f"{method} removes {rep.removed_share:.0%} of the reward variance, val label agreement "
                     f"{rep.agreement_before:.3f} -> {rep.agreement_after:.3f}"
                     + ("" if ok else " (lowers it: its estimate carries label signal, do not use it)"))
        if ok:
            keep.append((rep.agreement_after, f"reward.debias={method}"))
    keep.sort(key=lambda t: -t[0])
    return "de-biasing: " + "; ".join(parts), [k for _, k in keep]


def target_concentration(data: Any, temperature: float, *, label_weight: float = 0.0, reward_norm: str = "none",
                         one_hot_weight: float = 0.95) -> tuple[float, float]:
    """(mean top-1 weight of RCE's targets, share of groups whose top-1 weight >= ``one_hot_weight``) at a reward
    temperature on ``data``."""
    from .losses import rce_targets

    t = rce_targets(data.labels, data.rewards, temperature, mask=data.mask, label_weight=label_weight,
                    reward_norm=reward_norm)
    top = t.masked_fill(~data.mask, 0.0).amax(dim=1)
    return float(top.mean()), float((top >= one_hot_weight).float().mean())


@check("rce_targets")
def check_rce_targets(ctx: RunContext) -> Finding:
    """How concentrated RCE's targets are at t_start and t_end. The temperature divides the raw rewards (unless
    ``rce.reward_norm`` normalises them per group), so its meaning is in units of the reward: the same t_end gives
    near-uniform targets on a small-scale reward and one-hot ones on a large-scale reward."""
    th, name = ctx.th, "rce_targets"
    splits = ctx.data()
    if splits is None:
        return _skip(name, ctx.data_missing(), th.one_hot_share)
    from .rce import RCEConfig
    from .reward_stats import reward_spread

    rce = RCEConfig(**{k: v for k, v in (_get(ctx.config, "rce") or {}).items()
                       if k in {f.name for f in dataclasses.fields(RCEConfig)}})
    train = splits.train
    temps = ((rce.t_start, rce.t_end) if rce.temperature_target == "rewards"
             else (rce.reward_temperature, rce.reward_temperature))
    (top_s, hot_s), (top_e, hot_e) = (target_concentration(train, t, label_weight=rce.label_weight,
                                                            reward_norm=rce.reward_norm,
                                                            one_hot_weight=th.one_hot_weight) for t in temps)
    n = train.mask.sum(1).float()
    spread = float(reward_spread(train).median())
    unit = ("raw reward units" if rce.reward_norm == "none" else
            "units of the group's reward std" if rce.reward_norm == "zscore" else "within-group rank in [0, 1]")
    msg = (f"RCE targets (reward_norm={rce.reward_norm}; T in {unit}; median within-group reward std "
           f"{_g(spread)}): mean top-1 weight {top_s:.2f} at T={_g(temps[0])} and {top_e:.2f} at T={_g(temps[1])} "
           f"(uniform: {float((1 / n).mean()):.2f}); effectively one-hot (top-1 >= {th.one_hot_weight:.0%}) in "
           f"{hot_s:.0%} and {hot_e:.0%} of groups")
    if _get(ctx.config, "rce.epochs") == 0:
        return Finding(name, False, hot_e, th.one_hot_share, msg + " (RCE was off in this run)", "")
    if hot_e < th.one_hot_share:
        return Finding(name, False, hot_e, th.one_hot_share, msg, "")
    fix = "rce.reward_norm=zscore" if rce.reward_norm == "none" else f"rce.t_end={_g(2 * rce.t_end)}"
    return Finding(name, True, hot_e, th.one_hot_share,
                   msg + " -> at t_end RCE mostly imitates the reward's argmax: the schedule is set by the reward's "
                   "scale, not by the softness you chose", f"{fix} (softer targets at the same temperature schedule)",
                   [fix])


@check("baselines")
def check_baselines(ctx: RunContext) -> Finding:
    """SFT against trivial rankers on the val split (v3kit/baselines.py): random (expected), raw-feature cosine
    (when the dims match) and the reward's own argmax; SFT below raw cosine means the v2 model is the weakest link."""
    name = "baselines"
    splits = ctx.data()
    if splits is None:
        return _skip(name, ctx.data_missing())
    from .baselines import baseline_table

    table = baseline_table(splits.val)
    sft_rows = _rows(ctx.df, "rce", "val")
    sft_rows = sft_rows[sft_rows["epoch"] == 0] if "epoch" in sft_rows.columns else sft_rows.iloc[0:0]
    if sft_rows.empty:
        sft_rows = _rows(ctx.df, "grpo", "val").iloc[:1]  # no RCE: GRPO's epoch 0 is SFT
    metrics = [m for m in ("acc@1", "mrr") if m in table.columns]
    parts = [f"{b}: " + ", ".join(f"{m} {table.loc[b, m]:.3f}" for m in metrics) for b in table.index]
    oracle = table.loc["reward_oracle", "acc@1"]
    msg = (f"val split, {'; '.join(parts)} (the reward's argmax is the label in {oracle:.0%} of groups: reward-label "
           f"disagreement {1 - oracle:.0%})")
    if sft_rows.empty or "acc@1" not in sft_rows.columns:
        return Finding(name, False, None, None, msg + "; no SFT row in metrics.csv to compare", "")
    sft = sft_rows.iloc[0]
    msg = f"SFT acc@1 {float(sft['acc@1']):.3f}" + (f", mrr {float(sft['mrr']):.3f}" if "mrr" in sft.index else "") + \
        f"; {msg}"
    if "raw_cosine" not in table.index:
        return Finding(name, False, float(sft["acc@1"]), float(table.loc["random", "acc@1"]),
                       msg + " (no raw cosine: query and candidate features differ in dim)", "")
    cos = float(table.loc["raw_cosine", "acc@1"])
    value = float(sft["acc@1"])
    if value >= cos:
        return Finding(name, False, value, cos, msg, "")
    from .model import DEFAULT_TARGET
    target = _get(ctx.config, "model.target")
    if target in (None, DEFAULT_TARGET):
        switch = "model.residual=true model.sim_temperature=0.1"
        fix = (f"{switch} (towers that start as the raw-feature cosine and learn a correction, so SFT cannot start "
               "below it), then RCE/GRPO from that SFT")
        switches = [switch]
    else:
        fix = ("start your towers at the raw features and learn a residual correction (x + f(x), f's last layer "
               "zero-initialised), or improve SFT (epochs, lr, size); RCE/GRPO start from it")
        switches = []
    return Finding(name, True, value, cos, msg + " -> SFT ranks below the raw-feature cosine: the v2 model itself "
                   "is the weakest link", fix, switches)


# ---------------------------------------------------------------- public API

def diagnose(
    run: str | Path | pd.DataFrame,
    config: dict[str, Any] | None = None,
    thresholds: Thresholds | None = None,
    *,
    splits: Any = None,
    sft: tuple[Any, float] | None = None,
) -> list[Finding]:
    """Every registered check (see :func:`check_names`) on a run dir (reads ``metrics.csv`` and ``config.yaml``) or
    on a metrics frame.

    ``config`` (nested dict as in ``config.yaml``, or a ``RunConfig``) overrides the run dir's; without one the
    checks still run, but cause attribution and some suggestions are less specific. The checks that need the data
    (RCE's loss floor, the reward shortcut, the baselines) rebuild it from a run dir's config, or use ``splits``;
    ``sft`` = (SFT model, its logit temperature) stands in for the run dir's SFT checkpoint.
    """
    th = thresholds or Thresholds()
    if isinstance(run, pd.DataFrame):
        df, file_cfg, run_dir = run, {}, None
    else:
        df, file_cfg = load_run(run)
        run_dir = Path(run)
    if config is not None and dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    ctx = RunContext(df, file_cfg if config is None else config, th, run_dir, splits, sft)
    findings = []
    for name, fn in _REGISTRY.items():
        try:
            f = fn(ctx)
            if f.triggered and not f.switches:
                f.switches = switch_tokens(f.suggestion)
            findings.append(f)
        except (KeyError, ValueError, TypeError, IndexError) as e:  # malformed input: report, never crash
            findings.append(_skip(name, f"could not evaluate ({type(e).__name__}: {e})"))
    return findings


def report_frame(findings: Iterable[Finding]) -> pd.DataFrame:
    """One row per finding; columns as the :class:`Finding` fields."""
    cols = [f.name for f in dataclasses.fields(Finding)]
    return pd.DataFrame([dataclasses.asdict(f) for f in findings], columns=cols)


def format_report(findings: Iterable[Finding], title: str | None = None, run: str | Path | None = None) -> str:
    """Readable text: one line per check (⚠ flagged, ✔ fine, – skipped) with its number and threshold, then, under
    each flagged check, the switch to *test* and the ablation that tests it against the run (``run``: the run dir
    the commands name)."""
    from .doctor_grid import GRID_FILE

    findings = list(findings)
    width = max((len(f.check) for f in findings), default=0)
    where = str(run) if run is not None else "RUN_DIR"
    lines = [title or "GRPO health report"]

    def add(text: str, indent: str = "", more: str | None = None) -> None:
        lines.extend(textwrap.wrap(text, REPORT_WIDTH, initial_indent=indent,
                                   subsequent_indent=indent if more is None else more, break_on_hyphens=False)
                     or [indent])

    for f in findings:
        mark = "⚠" if f.triggered else ("–" if f.value is None else "✔")
        num = "" if f.value is None else f"value {_g(f.value)}"
        if f.threshold is not None and f.value is not None:
            num += f" (threshold {_g(f.threshold)})"
        lines.append(f"{mark} {f.check:<{width}}  {num}".rstrip())
        add(f.message, "    ")
        if f.triggered and f.suggestion:
            add(f"-> test: {f.suggestion}", "    ", "       ")
    flagged = [f for f in findings if f.triggered]
    skipped = sum(f.value is None and not f.triggered for f in findings)
    summary = f"{len(flagged)} of {len(findings)} checks flagged" + (
        f": {', '.join(f.check for f in flagged)}" if flagged else "")
    add(summary + (f"; {skipped} skipped" if skipped else ""))
    ordered = [f for f in evidence_order(flagged) if f.switches]
    if ordered:
        add("What to test, strongest evidence first (checks against the labels and the data before "
            "training-mechanics checks; then by how far past its threshold):")
        for i, f in enumerate(ordered, 1):
            add(f"{i}. {f.check}: " + " | ".join(f.switches), "  ", "     ")
        add(f"Test them against the run: v3kit investigate {where} (a verdict: what to ship), or v3kit doctor "
            f"{where} --grid && v3kit ablate --grid {Path(where) / GRID_FILE}")
    if flagged:
        add("Suggestions are hypotheses from one run: adopt a switch only once its ablation beats 'run'.")
    return "\n".join(lines)


REPORT_WIDTH = 100  # report lines wrap here (terminals, notebooks and the README transcript)

# Checks that compare the run with the labels or the data itself: their evidence is about what the shipped metric
# loses, so they are tested before the checks of GRPO's mechanics (ratios, clipping, KL, entropy).
_DATA_CHECKS = ("baselines", "reward_vs_label", "reward_shortcut", "rce_converged")


def evidence(f: Finding) -> float:
    """How far a flagged finding is past its threshold, as a factor >= 1 (either direction); 1 when unknown."""
    if f.value is None or f.threshold is None or f.value <= 0 or f.threshold <= 0:
        return 1.0
    return max(f.value / f.threshold, f.threshold / f.value)


def evidence_order(findings: Iterable[Finding]) -> list[Finding]:
    """Flagged findings, data checks first, each tier by :func:`evidence` (strongest first)."""
    return sorted(findings, key=lambda f: (f.check not in _DATA_CHECKS, -evidence(f)))


def cmd_doctor(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    findings = diagnose(run)
    print(format_report(findings, title=f"GRPO health report: {run}", run=run))
    if args.csv:
        atomic_write_frame(args.csv, report_frame(findings))
    if args.grid:
        from .doctor_grid import write_doctor_grid
        path = write_doctor_grid(run, findings)
        print(f"wrote {path}: test the suggestions with `v3kit ablate --grid {path}`")
    return 0


def register_cli(subparsers: Any) -> None:
    """``v3kit doctor RUN_DIR [--grid]``: the GRPO health report of a finished (or partial) run."""
    p = subparsers.add_parser("doctor", help="GRPO health report of a run dir: what looks wrong and what to test")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run dir written by `v3kit run` (holds metrics.csv)")
    p.add_argument("--csv", metavar="PATH", help="also save the findings as a table")
    p.add_argument("--grid", action="store_true",
                   help="also write RUN_DIR/doctor_grid.yaml: an ablation grid that tests each suggested switch "
                        "against the run's own config (run it with `v3kit ablate --grid`)")
    p.set_defaults(func=cmd_doctor)
