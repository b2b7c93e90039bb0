"""reward.debias: the per-candidate prior (cross-fitted) and the candidate-feature estimate, against hand computations
and slow loops; and what the pipeline does with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v3kit.data import GroupData, Splits
from v3kit.data.debias import (
    DebiasError,
    RewardConfig,
    _folds,
    candidate_prior,
    candidate_prior_from,
    debias_splits,
    feature_estimate,
    recurring_share,
)


def groups(rewards, ids, labels=None, feats=None) -> GroupData:
    r = torch.tensor(rewards, dtype=torch.float32)
    n, g = r.shape
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask = ids_t >= 0
    cand_x = (
        torch.tensor(feats, dtype=torch.float32)
        if feats is not None
        else torch.randn(n, g, 3, generator=torch.Generator().manual_seed(0))
    )
    return GroupData(
        query_x=torch.zeros(n, 3),
        cand_x=cand_x * mask.unsqueeze(-1),
        mask=mask,
        labels=torch.tensor(labels or [0] * n),
        rewards=torch.where(mask, r, torch.zeros(())),
        query_ids=[f"q{i}" for i in range(n)],
        cand_ids=ids_t,
    )


def test_prior_by_hand_one_query_per_fold():
    # 3 queries, 3 folds: each query's prior comes from the two others. Centred rewards:
    # q0: ids (0, 1) rewards (1, 3) -> (-1, +1); q1: ids (0, 2) rewards (5, 1) -> (+2, -2);
    # q2: ids (1, 2) rewards (0, 4) -> (-2, +2).
    d = groups([[1, 3], [5, 1], [0, 4]], [[0, 1], [0, 2], [1, 2]])
    assert sorted(_folds(3, 3, 0).tolist()) == [0, 1, 2]
    prior = candidate_prior(d, folds=3, shrinkage=1.0)
    # q0: id 0 seen in q1 (+2) -> 2/(1+1) = 1; id 1 seen in q2 (-2) -> -1
    # q1: id 0 seen in q0 (-1) -> -0.5; id 2 seen in q2 (+2) -> 1
    # q2: id 1 seen in q0 (+1) -> 0.5; id 2 seen in q1 (-2) -> -1
    assert prior.tolist() == [[1.0, -1.0], [-0.5, 1.0], [0.5, -1.0]]
    assert candidate_prior(d, folds=3, shrinkage=0.0).tolist() == [[2.0, -2.0], [-1.0, 2.0], [1.0, -2.0]]


def test_prior_matches_a_slow_loop_and_ignores_the_querys_own_reward():
    gen = np.random.default_rng(3)
    n, g = 40, 5
    ids = gen.integers(0, 12, (n, g))
    ids[gen.random((n, g)) < 0.2] = -1
    ids[:, :2] = gen.integers(0, 12, (n, 2))  # >= 2 candidates
    rewards = gen.normal(size=(n, g))
    d = groups(rewards.tolist(), ids.tolist())
    prior = candidate_prior(d, folds=4, shrinkage=0.5, seed=7)
    folds = _folds(n, 4, 7).numpy()
    mask = ids >= 0
    y = np.where(mask, d.rewards.double().numpy(), 0.0)
    y = np.where(mask, y - y.sum(1, keepdims=True) / mask.sum(1, keepdims=True), 0.0)
    for q in range(n):
        for c in range(g):
            if not mask[q, c]:
                assert prior[q, c] == 0
                continue
            other = [
                (p, k)
                for p in range(n)
                for k in range(g)
                if folds[p] != folds[q] and mask[p, k] and ids[p, k] == ids[q, c]
            ]
            want = sum(y[p, k] for p, k in other) / (len(other) + 0.5)
            assert prior[q, c].item() == pytest.approx(want, abs=1e-12)
    # cross-fitting: changing query 0's own rewards does not move query 0's prior (other queries' may move)
    r2 = rewards.copy()
    r2[0] += gen.normal(size=g) * 10
    prior2 = candidate_prior(groups(r2.tolist(), ids.tolist()), folds=4, shrinkage=0.5, seed=7)
    assert torch.equal(prior2[0], prior[0])
    assert not torch.equal(prior2, prior)


def test_prior_needs_recurring_ids():
    d = groups([[1, 2], [3, 4]], [[0, 1], [2, 3]])
    assert recurring_share(d) == 0.0
    with pytest.raises(DebiasError, match="recur across queries.*candidate_features"):
        candidate_prior(d)
    d.cand_ids = None
    with pytest.raises(DebiasError, match="needs candidate ids"):
        candidate_prior(d)


def test_feature_estimate_matches_numpy_ridge():
    gen = np.random.default_rng(0)
    n, g, k = 30, 4, 3
    feats = gen.normal(size=(n, g, k))
    rewards = feats @ np.array([1.0, -2.0, 0.5]) + 0.1 * gen.normal(size=(n, g))
    d = groups(rewards.tolist(), np.arange(n * g).reshape(n, g).tolist(), feats=feats.tolist())
    est = feature_estimate(d, folds=3, ridge=2.0, seed=1).numpy()
    folds = _folds(n, 3, 1).numpy()
    x = d.cand_x.double().numpy()
    xc = x - x.mean(1, keepdims=True)
    y = d.rewards.double().numpy()
    y = y - y.mean(1, keepdims=True)
    for f in range(3):
        fit = folds != f
        a, b = xc[fit].reshape(-1, k), y[fit].reshape(-1)
        w = np.linalg.solve(a.T @ a + 2.0 * np.eye(k), a.T @ b)
        np.testing.assert_allclose(est[folds == f], xc[folds == f] @ w, atol=1e-10)


def shortcut_world(n=300, g=6, seed=0):
    """Each candidate id has a query-independent bonus; the label is the best by the query-dependent part."""
    gen = np.random.default_rng(seed)
    ids = gen.integers(0, 40, (n, g))
    bonus = gen.normal(size=40) * 2.0
    rel = gen.normal(size=(n, g))
    rewards = rel + bonus[ids]
    labels = rel.argmax(1).tolist()
    return groups(rewards.tolist(), ids.tolist(), labels=labels)


def test_prior_removes_a_candidate_shortcut_and_restores_label_agreement():
    d = shortcut_world()
    splits = Splits(train=d.subset(range(200)), val=d.subset(range(200, 250)), test=d.subset(range(250, 300)))
    out, rep = debias_splits(splits, RewardConfig(debias="candidate_prior"))
    assert rep.removed_share > 0.5  # the bonus is most of the within-group variance
    assert rep.agreement_after > rep.agreement_before + 0.2
    assert out.val is splits.val and out.test is splits.test  # held-out rewards untouched
    want = splits.train.rewards.double() - candidate_prior(splits.train)
    assert torch.equal(out.train.rewards, torch.where(splits.train.mask, want.float(), torch.zeros(())))
    # val's prior comes from the whole training split
    pv = candidate_prior_from(splits.train, splits.val)
    assert pv.shape == splits.val.rewards.shape and (pv[~splits.val.mask] == 0).all()


def test_config_and_pipeline(tmp_path):
    from v3kit.config import ConfigError, load_config
    from v3kit.pipeline import read_run_info, run_pipeline

    with pytest.raises(ConfigError, match="reward.debias must be one of"):
        load_config(None, ["reward.debias=prior"])
    # the synthetic world has no candidate ids: one line, before SFT
    cfg = load_config(
        None,
        [
            "progress=false",
            "data.synthetic.n_queries=120",
            f"run_dir={tmp_path / 'p'}",
            "reward.debias=candidate_prior",
        ],
    )
    with pytest.raises(DebiasError, match="needs candidate ids"):
        run_pipeline(cfg)
    assert not (tmp_path / "p" / "sft.pt").exists()
    cfg = load_config(
        None,
        [
            "progress=false",
            "data.synthetic.n_queries=120",
            "sft.epochs=1",
            "rce.epochs=1",
            "grpo.epochs=1",
            f"run_dir={tmp_path / 'f'}",
            "reward.debias=candidate_features",
        ],
    )
    res = run_pipeline(cfg)
    info = read_run_info(tmp_path / "f")
    assert info["debias"] == "candidate_features" and 0 < info["debias_removed_share"] < 1
    assert res.debias is not None and res.debias.line().startswith("reward.debias=candidate_features: removed")


def test_the_same_splits_are_debiased_once_per_setting_and_seed(monkeypatch):
    """A search's trials and a stack's members de-bias the same splits with the same settings: the second call gives
    the first's result (equal rewards, a copy; an equal report) without computing it again. Another seed, setting,
    method or val split computes afresh, and the entries go with their training split."""
    import gc

    from v3kit.data import debias as D

    d = shortcut_world()
    splits = Splits(train=d.subset(range(200)), val=d.subset(range(200, 250)), test=d.subset(range(250, 300)))
    calls = []
    real = D.estimates
    monkeypatch.setattr(D, "estimates", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    cfg = RewardConfig(debias="candidate_features")
    first, rep1 = D.debias_report("candidate_features", splits, cfg, seed=0)
    want = first.clone()
    first.add_(1.0)  # a caller's change to its copy does not reach the next caller
    again, rep2 = D.debias_report("candidate_features", splits, cfg, seed=0)
    assert len(calls) == 1 and torch.equal(again, want) and rep2 == rep1 and rep2 is not rep1
    assert torch.equal(debias_splits(splits, cfg, seed=0)[0].train.rewards, again) and len(calls) == 1
    other_val = Splits(train=splits.train, val=d.subset(range(250, 300)), test=splits.test)
    for method, c, s, sp in [
        ("candidate_features", cfg, 1, splits),  # another seed: other folds
        ("candidate_features", RewardConfig(debias="candidate_features", feature_ridge=5.0), 0, splits),
        ("candidate_prior", RewardConfig(debias="candidate_prior"), 0, splits),
        ("candidate_features", cfg, 0, other_val),
    ]:
        n = len(calls)
        fresh, _ = D.debias_report(method, sp, c, seed=s)
        assert len(calls) == n + 1
        monkeypatch.setattr(D, "_REPORTS", {})  # the same call with nothing kept gives the same numbers
        assert torch.equal(D.debias_report(method, sp, c, seed=s)[0], fresh)
    key = id(splits.train)
    D.debias_report("candidate_features", splits, cfg, seed=0)
    assert key in D._REPORTS
    del splits, other_val, sp
    gc.collect()
    assert key not in D._REPORTS
