"""The doctor's context: what a check reads (:class:`DoctorContext`), what it returns (:class:`Finding`), the
thresholds of every check (:class:`Thresholds`), the ``@check`` registry, and the helpers that read ``metrics.csv``."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import pandas as pd
import yaml

from ..config import ConfigError, RunConfig, field_types, from_dict, safe_load_bounded
from ..pipeline import prepare_data, recorded_sft_checkpoint, recorded_split_seed
from ..train.checkpoint import load_checkpoint, model_from_checkpoint
from ..train.metrics_log import read_metrics_frame


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
    # v3kit/data/shortcut.py): with no shortcut it is ~0 (the default synthetic world with reward_bias=0 gives < 1%);
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


CheckFn = Callable[["DoctorContext", str], Finding]  # a check gets the context and its own registered name
REGISTRY: dict[str, CheckFn] = {}

# The report's order, declared here rather than inherited from the order the check modules are imported in: the
# GRPO-log checks first (they need only metrics.csv), then those that need the data or the checkpoints. A new check
# is registered with @check and named here (diagnose refuses a registered check missing from this list).
REPORT_ORDER = (
    "step0_ratio",
    "clip_ratio",
    "zero_std_groups",
    "kl_growth",
    "kl_pinned",
    "entropy_collapse",
    "reward_vs_label",
    "rce_converged",
    "reward_shortcut",
    "rce_targets",
    "baselines",
)


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register a doctor check under ``name`` (also listed in :data:`REPORT_ORDER`); it is called as
    ``fn(ctx, name)``."""

    def register(fn: CheckFn) -> CheckFn:
        if name in REGISTRY:
            raise ValueError(f"doctor check {name!r} is registered twice")
        REGISTRY[name] = fn
        return fn

    return register


def check_names() -> list[str]:
    """The checks, in report order (:data:`REPORT_ORDER`)."""
    return list(REPORT_ORDER)


typed_fields = functools.cache(field_types)  # a dataclass's field types, read once per class


class ConfigView:
    """A run's config dict (possibly partial: a hand-made frame's, an old run's) read through the typed
    :class:`~v3kit.config.RunConfig`: ``view.grpo.kl_beta``. A value the config does not hold reads None (unknown,
    not the default); a name RunConfig does not have raises :class:`UnknownConfigKey`, so a renamed field fails
    loudly instead of reading None."""

    def __init__(self, node: Any, cls: type = RunConfig, path: str = "") -> None:
        self._node, self._cls, self._path = node, cls, path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        hints = typed_fields(self._cls)
        if name not in hints:
            raise UnknownConfigKey(f"the doctor reads config key {self._path + name!r}, which RunConfig does not have")
        value = self._node.get(name) if isinstance(self._node, dict) else None
        if dataclasses.is_dataclass(hints[name]):
            return ConfigView(value, hints[name], f"{self._path}{name}.")
        return value

    def __bool__(self) -> bool:
        return bool(self._node)


@dataclass
class DoctorContext:
    """What a check reads: the metrics frame, the config, the thresholds and, for a run dir, its data and
    checkpoints (loaded lazily, once, by the checks that need them)."""

    df: pd.DataFrame
    config: dict[str, Any]
    th: Thresholds
    run_dir: Path | None = None
    splits: Any = None  # v3kit.data.Splits given by the caller (else built from the config of a run dir)
    sft: Any = None  # (SFT model, its sim_temperature) given by the caller (else the run dir's SFT checkpoint)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> RunConfig:
        """The config as typed attributes (``ctx.cfg.grpo.kl_beta``, see :class:`ConfigView`): RunConfig's fields,
        each None where the run's config does not say."""
        return cast(RunConfig, ConfigView(self.config))

    def sft_model(self) -> tuple[Any, float] | None:
        """(the SFT model, its logit temperature), or None: from the caller, else the run dir's ``sft.pt`` or the
        SFT checkpoint ``run_info.json`` records (ablation folders keep that one; only per-epoch ones go)."""
        if self.sft is None and "sft" not in self._cache:
            self._cache["sft"] = None
            if self.run_dir is not None:
                path = recorded_sft_checkpoint(self.run_dir) or self.run_dir / "sft.pt"
                if Path(path).is_file():
                    try:
                        ckpt = load_checkpoint(path)
                        self._cache["sft"] = (
                            model_from_checkpoint(ckpt, path),
                            float(ckpt["model_config"]["sim_temperature"]),
                        )
                    except Exception:  # noqa: BLE001 - an unreadable checkpoint costs those numbers only
                        self._cache["sft"] = None
        return self.sft if self.sft is not None else self._cache["sft"]

    def data(self) -> Any:
        """The run's :class:`Splits`, or None (a bare frame, or data that cannot be rebuilt)."""
        if self.splits is None and "splits" not in self._cache:
            self._cache["splits"] = None
            if self.run_dir is not None and self.config:
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
            loaded = safe_load_bounded(cfg_path.read_text(), f"config file {cfg_path}")
            config = loaded if isinstance(loaded, dict) else {}
        except (yaml.YAMLError, ConfigError):  # a broken config only costs the cause attribution, not the report
            config = {}
    frame = read_metrics_frame(path)
    missing = [c for c in ("stage", "split", "epoch", "step") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path} lacks the column(s) {missing}: it is not a v3kit metrics.csv (written by `v3kit run`)"
        )
    return frame, config


class UnknownConfigKey(RuntimeError):
    """A check reads a key :class:`~v3kit.config.RunConfig` does not have: a renamed field. Not one of the errors
    :func:`diagnose` turns into a skipped check, so a rename fails loudly (in the tests) instead of reading None."""


def log_rows(df: pd.DataFrame, stage: str, split: str) -> pd.DataFrame:
    if not {"stage", "split"} <= set(df.columns):
        return df.iloc[0:0]
    out = df[(df["stage"] == stage) & (df["split"] == split)]
    order = [c for c in ("epoch", "step") if c in out.columns]
    return out.sort_values(order, kind="stable").reset_index(drop=True) if order else out.reset_index(drop=True)


def metric_column(rows: pd.DataFrame, name: str) -> pd.Series:
    """The non-missing values of a column (empty when the column does not exist)."""
    return rows[name].dropna() if name in rows.columns else pd.Series(dtype=float)


def epoch_means(rows: pd.DataFrame, name: str) -> pd.Series:
    if name not in rows.columns or "epoch" not in rows.columns:
        return pd.Series(dtype=float)
    return rows.dropna(subset=[name]).groupby("epoch")[name].mean().sort_index()


def val_series(rows: pd.DataFrame, name: str) -> pd.Series:
    """One value per evaluated epoch (the last row wins if an epoch was logged twice)."""
    if name not in rows.columns or "epoch" not in rows.columns:
        return pd.Series(dtype=float)
    return rows.dropna(subset=[name]).groupby("epoch")[name].last().sort_index()


def fmt_num(x: float) -> str:
    return f"{x:.4g}"


_SWITCH = re.compile(r"\b(?:rce|grpo|reward|model|sft)\.[a-z_]+=[^\s,;()]+")


def switch_tokens(text: str) -> list[str]:
    """The ``rce.*=`` / ``grpo.*=`` / ``reward.*=`` / ``model.*=`` / ``sft.*=`` overrides written in a suggestion,
    in order, once each (each one variant of an ablation against the run)."""
    return list(dict.fromkeys(_SWITCH.findall(text)))


def skip_finding(check: str, why: str, threshold: float | None = None) -> Finding:
    return Finding(check, False, None, threshold, f"skipped: {why}", "")
