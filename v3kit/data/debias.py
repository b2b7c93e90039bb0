"""Reward de-biasing: remove the part of the reward that any query would give a candidate, before RCE and GRPO.

GRPO only sees the reward relative to its group, so a reward that pays for something in the candidate whatever the
query asked (length, a template, a "style") can be raised without reading the query. Two estimates of that
query-independent part, each subtracted from the training split's rewards (``reward.debias``):

* ``candidate_prior``: the candidate's own reputation. For a candidate id that recurs across queries, its prior is
  the mean of its within-group-centred reward over the *other* queries it appears in, shrunk towards 0 by
  ``reward.prior_shrinkage`` (``sum / (count + shrinkage)``). It is cross-fitted over ``reward.debias_folds``
  folds of queries: a query's own rewards never enter the prior subtracted from them, so the de-biasing cannot
  erase the query's own signal. Needs ``candidate_id`` values that recur across queries.
* ``candidate_features``: a ridge regression from the candidate's features (centred per group) to the
  within-group-centred reward (:mod:`v3kit.data.shortcut`), cross-fitted the same way. Features also carry what makes
  a candidate relevant in general, so this estimate can hold label signal: check the reward-label agreement the
  run logs before and after (the doctor's ``reward_shortcut`` check compares both methods on val).

Validation and test rewards are never changed (their ``reward@1`` stays comparable across runs); the run logs the
share of the training reward's within-group variance removed and the val reward-label agreement before and after,
where val's estimate is fitted on the whole training split (val queries are never in it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..bounds import check_max
from .contract import GroupData, Splits
from .reward_stats import label_reward_agreement
from .shortcut import centre_in_group, centred_features, cross_fit_ridge, fit_ridge

# The one home of the de-biasing methods: the estimators of the candidate effect, then with "none" the config values.
DEBIAS_ESTIMATORS = ("candidate_prior", "candidate_features")
DEBIAS_METHODS = ("none", *DEBIAS_ESTIMATORS)


@dataclass
class RewardConfig:
    debias: str = "none"
    """Remove the query-independent part of the training rewards before RCE and GRPO: ``none`` |
    ``candidate_prior`` (per-candidate mean centred reward over other queries; needs candidate ids that recur) |
    ``candidate_features`` (ridge fit from candidate features). Val/test rewards are left as they are."""
    debias_folds: int = 5
    """Folds of training queries for the cross-fitting: a query's own rewards never enter its estimate; 2 to
    1,000."""
    prior_shrinkage: float = 1.0
    """``candidate_prior`` = sum of the candidate's centred rewards / (its count + this): a candidate seen once
    elsewhere gets half its one observation, so a single noisy reward does not become a prior."""
    feature_ridge: float = 1.0
    """L2 penalty of ``candidate_features``' ridge regression (on per-group-centred features)."""

    def __post_init__(self) -> None:
        if self.debias not in DEBIAS_METHODS:
            raise ValueError(f"reward.debias must be one of {DEBIAS_METHODS}, got {self.debias!r}")
        if self.debias_folds < 2:
            raise ValueError(f"reward.debias_folds must be >= 2, got {self.debias_folds}")
        check_max("reward.debias_folds", self.debias_folds, 1_000, "each fold refits the estimate; is it a typo?")
        if self.prior_shrinkage < 0 or self.feature_ridge < 0:
            raise ValueError(
                f"reward.prior_shrinkage and reward.feature_ridge must be >= 0, got "
                f"{self.prior_shrinkage} and {self.feature_ridge}"
            )


class DebiasError(ValueError):
    """The data cannot support the chosen de-biasing (one line naming the key and the alternative)."""


def _folds(n: int, k: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % k


def recurring_share(data: GroupData) -> float:
    """Share of the valid candidate entries whose ``candidate_id`` also appears in another query (0 without ids)."""
    if data.cand_ids is None:
        return 0.0
    ids = data.cand_ids[data.mask]
    if ids.numel() == 0:
        return 0.0
    # queries per id: count distinct (query, id) pairs, so an id repeated inside one group is still one query
    rows = torch.arange(len(data)).unsqueeze(1).expand_as(data.cand_ids)[data.mask]
    pairs = torch.unique(torch.stack([ids, rows]), dim=1)
    per_id = torch.bincount(pairs[0], minlength=int(ids.max()) + 1)
    return float((per_id[ids] > 1).double().mean())


def _require_ids(data: GroupData) -> float:
    """:func:`recurring_share` of ``data``; :class:`DebiasError` when it is 0 (the prior has nothing to average)."""
    if data.cand_ids is None:
        raise DebiasError(
            "reward.debias=candidate_prior needs candidate ids (the table's candidate_id column; the "
            "synthetic world has none): use reward.debias=candidate_features"
        )
    share = recurring_share(data)
    if share == 0.0:
        raise DebiasError(
            "reward.debias=candidate_prior needs candidate_ids that recur across queries, but no "
            "candidate_id of the training split appears in more than one query: use "
            "reward.debias=candidate_features"
        )
    return share


def check_debias(cfg: RewardConfig, train: GroupData) -> None:
    """Raise :class:`DebiasError` (one line) when ``train`` cannot support ``cfg.debias``."""
    if cfg.debias == "candidate_prior":
        _require_ids(train)


def _id_sums(data: GroupData, y: Tensor, rows: Tensor, n_ids: int) -> tuple[Tensor, Tensor]:
    """Per candidate id: the sum of ``y`` and the count of entries over the groups ``rows`` (a bool [N])."""
    keep = data.mask & rows.unsqueeze(1)
    ids = data.cand_ids[keep]
    sums = torch.zeros(n_ids, dtype=torch.float64).index_add_(0, ids, y[keep])
    counts = torch.zeros(n_ids, dtype=torch.float64).index_add_(0, ids, torch.ones_like(y[keep]))
    return sums, counts


def candidate_prior(data: GroupData, *, folds: int = 5, shrinkage: float = 1.0, seed: int = 0) -> Tensor:
    """[N, G] cross-fitted per-candidate prior of ``data`` (float64, 0 at padding): for a query in fold k, the
    prior of each of its candidates is computed from the queries of the other folds only."""
    _require_ids(data)
    return _prior(data, folds, shrinkage, seed)


def _prior(data: GroupData, folds: int, shrinkage: float, seed: int) -> Tensor:
    """:func:`candidate_prior` of ``data`` already checked by :func:`_require_ids`."""
    y = centre_in_group(data.rewards.double(), data.mask)
    n_ids = int(data.cand_ids[data.mask].max()) + 1
    fold = _folds(len(data), folds, seed)
    out = torch.zeros_like(y)
    for k in range(folds):
        held = fold == k
        s, c = _id_sums(data, y, ~held, n_ids)  # summed over the other folds: held-out rewards never enter
        keep = data.mask & held.unsqueeze(1)
        ids = data.cand_ids[keep]
        out[keep] = s[ids] / (c[ids] + shrinkage).clamp_min(1e-12)
    return out


def candidate_prior_from(fit: GroupData, target: GroupData, *, shrinkage: float = 1.0) -> Tensor:
    """[N, G] prior of ``target``'s candidates estimated from all of ``fit`` (disjoint queries, e.g. train -> val);
    0 for a candidate ``fit`` never saw."""
    _require_ids(fit)
    return _prior_from(fit, target, shrinkage)


def _prior_from(fit: GroupData, target: GroupData, shrinkage: float) -> Tensor:
    """:func:`candidate_prior_from` with ``fit`` already checked by :func:`_require_ids`."""
    if target.cand_ids is None:
        return torch.zeros_like(target.rewards, dtype=torch.float64)
    y = centre_in_group(fit.rewards.double(), fit.mask)
    n_ids = max(int(fit.cand_ids[fit.mask].max()), int(target.cand_ids[target.mask].max())) + 1
    s, c = _id_sums(fit, y, torch.ones(len(fit), dtype=torch.bool), n_ids)
    ids = target.cand_ids.clamp_min(0)
    return torch.where(target.mask, s[ids] / (c[ids] + shrinkage).clamp_min(1e-12), torch.zeros((), dtype=s.dtype))


def feature_estimate(data: GroupData, *, folds: int = 5, ridge: float = 1.0, seed: int = 0) -> Tensor:
    """[N, G] cross-fitted ridge prediction of the centred reward from the candidate features (float64)."""
    return _feature_fits(data, folds, ridge, seed)[0]


def feature_estimate_from(fit: GroupData, target: GroupData, *, ridge: float = 1.0) -> Tensor:
    """[N, G] the ridge fitted on all of ``fit``, applied to ``target``."""
    y = centre_in_group(fit.rewards.double(), fit.mask)
    return _apply(fit_ridge(centred_features(fit), y, fit.mask, ridge), target)


def _feature_fits(data: GroupData, folds: int, ridge: float, seed: int) -> tuple[Tensor, Tensor]:
    """(:func:`feature_estimate`, the ridge weights fitted on all of ``data``): one pass over the data for both."""
    y = centre_in_group(data.rewards.double(), data.mask)
    return cross_fit_ridge(centred_features(data), y, data.mask, _folds(len(data), folds, seed), ridge)


def _apply(w: Tensor, target: GroupData) -> Tensor:
    out = centred_features(target) @ w
    return torch.where(target.mask, out, torch.zeros((), dtype=out.dtype))


@dataclass
class DebiasReport:
    method: str
    removed_share: float  # share of the training rewards' within-group variance the de-biasing removed
    agreement_before: float  # val: how often the highest-reward candidate is the label, original rewards
    agreement_after: float  # ... with the de-biased rewards (val's estimate fitted on the training split)
    recurring_share: float | None = None  # candidate_prior: share of training entries whose id recurs
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "debias": self.method,
            "debias_removed_share": self.removed_share,
            "debias_agreement_before": self.agreement_before,
            "debias_agreement_after": self.agreement_after,
            **({"debias_recurring_share": self.recurring_share} if self.recurring_share is not None else {}),
        }

    def line(self) -> str:
        more = (
            f"; {self.recurring_share:.0%} of training candidates recur across queries"
            if self.recurring_share is not None
            else ""
        )
        return (
            f"reward.debias={self.method}: removed {self.removed_share:.1%} of the training reward's within-group "
            f"variance; val reward-label agreement {self.agreement_before:.3f} -> {self.agreement_after:.3f}{more}"
        )


def estimates(
    method: str, train: GroupData, other: GroupData, cfg: RewardConfig, seed: int = 0
) -> tuple[Tensor, Tensor, float | None]:
    """(cross-fitted estimate on ``train``, estimate on ``other`` fitted on all of ``train``, and for
    ``candidate_prior`` the share of training entries whose id recurs) for ``method``; the ids are checked once."""
    if method == "candidate_prior":
        share = _require_ids(train)
        return (
            _prior(train, cfg.debias_folds, cfg.prior_shrinkage, seed),
            _prior_from(train, other, cfg.prior_shrinkage),
            share,
        )
    if method == "candidate_features":
        est, w = _feature_fits(train, cfg.debias_folds, cfg.feature_ridge, seed)
        return est, _apply(w, other), None
    raise ValueError(f"reward.debias must be one of {DEBIAS_ESTIMATORS} here, got {method!r}")


def _removed_share(data: GroupData, estimate: Tensor) -> float:
    y = centre_in_group(data.rewards.double(), data.mask)
    after = centre_in_group(data.rewards.double() - estimate, data.mask)
    sst = float(y[data.mask].square().sum())
    return 1.0 - float(after[data.mask].square().sum()) / sst if sst > 0 else 0.0


# debias_report's results per training split alive, by its id (an entry is dropped when the split is collected; a
# GroupData is never changed in place, with_rewards makes a new one). The trials of a search and the members of a
# stack de-bias the same splits with the same settings, each run on its own: candidate_features takes about 1 s on
# a 2,000-query 384-d table.
_REPORTS: dict[int, dict[tuple[Any, ...], tuple[Any, Tensor, DebiasReport]]] = {}


def debias_report(method: str, splits: Splits, cfg: RewardConfig, seed: int = 0) -> tuple[Tensor, DebiasReport]:
    """The de-biased training rewards ([N, G] float32) and what the de-biasing did (see :class:`DebiasReport`); a
    second call with the same splits, settings and seed gives the first's result (a copy of its rewards)."""
    train, val = splits.train, splits.val
    key = (method, cfg.debias_folds, cfg.prior_shrinkage, cfg.feature_ridge, seed, id(val))
    done = _REPORTS.get(id(train))
    if done is None:
        done = _REPORTS[id(train)] = {}
        weakref.finalize(train, _REPORTS.pop, id(train), None)
    if key in done:
        val_ref, rewards, report = done[key]
        if val_ref() is val:  # not another object at a reused id
            return rewards.clone(), replace(report)
    est_train, est_val, share = estimates(method, train, val, cfg, seed)
    rewards = (train.rewards.double() - est_train).float()
    report = DebiasReport(
        method,
        _removed_share(train, est_train),
        label_reward_agreement(val),
        label_reward_agreement(val.with_rewards((val.rewards.double() - est_val).float())),
        share,
    )
    done[key] = (weakref.ref(val), rewards, report)
    return rewards.clone(), replace(report)


def debias_splits(splits: Splits, cfg: RewardConfig, seed: int = 0) -> tuple[Splits, DebiasReport | None]:
    """``splits`` with the training rewards de-biased per ``cfg`` (val/test untouched), and the report; the splits
    as they are (and None) for ``debias: none``."""
    if cfg.debias == "none":
        return splits, None
    rewards, report = debias_report(cfg.debias, splits, cfg, seed)
    return Splits(train=splits.train.with_rewards(rewards), val=splits.val, test=splits.test), report
