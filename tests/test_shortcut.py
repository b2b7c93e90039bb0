"""Reward shortcut analysis: finds the synthetic world's style shortcut, and its numbers match plain recomputations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from v3kit.data import GroupData, split_by_query
from v3kit.data.shortcut import centre_in_group, centred_features, cross_fit_ridge, fit_ridge, reward_shortcut
from v3kit.data.synthetic import SyntheticConfig, make_world
from v3kit.diagnose import diagnose


def world(bias: float, n: int = 400) -> GroupData:
    return make_world(SyntheticConfig(n_queries=n, reward_bias=bias))


def test_the_style_shortcut_is_found_and_grows_with_reward_bias():
    shares = [reward_shortcut(world(b)).explained_share for b in (0.0, 0.5, 1.0, 2.0)]
    assert abs(shares[0]) < 0.03  # no shortcut: candidate features alone predict ~nothing within a group
    assert shares == sorted(shares) and shares[-1] > 0.4


def test_a_reward_of_the_candidate_alone_is_all_shortcut_and_a_query_reward_is_none():
    g = torch.Generator().manual_seed(0)
    n, G, d = 300, 6, 5
    q, c = torch.randn(n, d, generator=g), torch.randn(n, G, d, generator=g)
    mask = torch.ones(n, G, dtype=torch.bool)
    w = torch.randn(d, generator=g)
    labels = torch.randint(0, G, (n,), generator=g)
    ids = [str(i) for i in range(n)]
    only_cand = reward_shortcut(GroupData(q, c, mask, labels, c @ w, ids))
    assert only_cand.explained_share > 0.99
    assert only_cand.acc_shortcut == pytest.approx(only_cand.acc_reward)
    only_query = reward_shortcut(GroupData(q, c, mask, labels, torch.einsum("nd,ngd->ng", q, c), ids))
    assert abs(only_query.explained_share) < 0.05


def test_policy_change_correlations_match_a_plain_recomputation():
    data = world(1.0, n=200)
    g = torch.Generator().manual_seed(1)
    change = torch.randn(data.mask.shape, generator=g) + 2 * data.rewards
    a = reward_shortcut(data, change)
    m = data.mask.numpy()
    rows = []
    for b in range(len(data)):  # centre within each group by hand, then correlate over all valid entries
        idx = np.flatnonzero(m[b])
        d = change[b, idx].double().numpy()
        r = data.rewards[b, idx].double().numpy()
        lab = (idx == int(data.labels[b])).astype(float)
        s = a.shortcut[b, idx].double().numpy()
        rows.append((d - d.mean(), s, (r - r.mean()) - s, lab - lab.mean()))
    d, s, rest, lab = (np.concatenate(x) for x in zip(*rows))
    assert a.corr_change_shortcut == pytest.approx(np.corrcoef(d, s)[0, 1], abs=1e-4)
    assert a.corr_change_rest == pytest.approx(np.corrcoef(d, rest)[0, 1], abs=1e-4)
    assert a.corr_change_label == pytest.approx(np.corrcoef(d, lab)[0, 1], abs=1e-4)
    # acc@1 of the shortcut ranking, by a loop
    acc = np.mean(
        [
            int(np.argmax(np.where(m[b], a.shortcut[b].numpy(), -np.inf))) == int(data.labels[b])
            for b in range(len(data))
        ]
    )
    assert a.acc_shortcut == pytest.approx(acc)


def test_doctor_flags_the_shortcut_only_in_a_biased_world():
    import pandas as pd

    found = {}
    for bias in (0.0, 1.5):
        splits = split_by_query(world(bias), val_frac=0.2, test_frac=0.2, seed=0)
        found[bias] = {f.check: f for f in diagnose(pd.DataFrame(), splits=splits)}["reward_shortcut"]
    assert not found[0.0].triggered and found[0.0].value < 0.05
    assert found[1.5].triggered and "whatever the query" in found[1.5].message
    assert "rce.label_weight=0.5" in found[1.5].switches


def _doctor_shortcut(data: GroupData):
    import pandas as pd

    splits = split_by_query(data, val_frac=0.2, test_frac=0.2, seed=0)
    return {f.check: f for f in diagnose(pd.DataFrame(), splits=splits)}["reward_shortcut"]


def test_reward_shortcut_says_whether_it_is_a_candidate_prior_or_label_signal():
    """Two worlds whose candidate features explain the within-group reward. (a) The reward is a per-candidate
    bonus of 50 recurring candidates, the label independent of it: the reward favours a candidate whatever the
    query. (b) Every candidate is new, and the label is the candidate with the most of a feature direction that
    the reward also pays for: what the features carry is label signal, and removing it lowers the agreement."""
    g = torch.Generator().manual_seed(0)
    n, G, d = 500, 6, 5
    q = torch.randn(n, d, generator=g)
    mask = torch.ones(n, G, dtype=torch.bool)
    ids = [str(i) for i in range(n)]
    pool = torch.randn(50, d, generator=g)
    which = torch.randint(0, 50, (n, G), generator=g)
    bonus = torch.randn(50, generator=g)
    labels = torch.randint(0, G, (n,), generator=g)
    rewards = bonus[which] + 0.1 * torch.randn(n, G, generator=g)
    a = _doctor_shortcut(GroupData(q, pool[which], mask, labels, rewards, ids, cand_ids=which))
    assert a.triggered and "favours a candidate whatever the query" in a.message and "label signal" not in a.message

    c = torch.randn(n, G, d, generator=g)
    w = torch.randn(d, generator=g)
    quality = c @ w
    labels = quality.argmax(dim=1)
    rewards = quality + 0.1 * torch.randn(n, G, generator=g)
    b = _doctor_shortcut(GroupData(q, c, mask, labels, rewards, ids))
    assert b.triggered and "label signal carried by the candidate features" in b.message
    assert "reward.debias=candidate_features" not in b.switches  # the doctor does not offer the harmful de-biasing


def _padded_groups(seed: int, n: int = 90, g: int = 5, d: int = 7) -> GroupData:
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(n, g, d, generator=gen, dtype=torch.float64) * 3
    mask = torch.ones(n, g, dtype=torch.bool)
    mask[::4, 3:] = False  # padded groups, of 3 valid candidates
    rewards = (c[..., :2].sum(-1) + torch.randn(n, g, generator=gen, dtype=torch.float64)).float()
    labels = torch.zeros(n, dtype=torch.long)
    return GroupData(torch.randn(n, d, generator=gen), c, mask, labels, rewards, [str(i) for i in range(n)])


@pytest.mark.parametrize("k", [2, 5])
def test_cross_fit_ridge_equals_a_separate_ridge_on_each_folds_complement(k):
    """The fits from summed per-fold normal equations against the plain way: a fresh ridge fit on every group not
    in the fold (and one on all groups), each from its own rows."""
    data = _padded_groups(k)
    y = centre_in_group(data.rewards.double(), data.mask)
    xc = centred_features(data)
    folds = torch.randperm(len(data), generator=torch.Generator().manual_seed(3)) % k
    pred, full = cross_fit_ridge(xc, y, data.mask, folds, ridge=0.7)
    want = torch.zeros_like(y)
    for f in range(k):
        w = fit_ridge(xc, y, (folds != f).unsqueeze(1) & data.mask, 0.7)
        want[folds == f] = xc[folds == f] @ w
    want[~data.mask] = 0.0
    torch.testing.assert_close(pred, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full, fit_ridge(xc, y, data.mask, 0.7), rtol=1e-10, atol=1e-10)


def test_centred_features_subtract_each_groups_mean_over_its_valid_candidates_and_leave_the_data_alone():
    data = _padded_groups(0)
    before = data.cand_x.clone()
    got = centred_features(data)
    assert torch.equal(data.cand_x, before)  # float64 features: the centring works on its own copy
    for i in (0, 1, 4):  # a padded group (every 4th) and full ones
        valid = data.cand_x[i][data.mask[i]]
        torch.testing.assert_close(got[i][data.mask[i]], valid - valid.mean(0), rtol=0, atol=1e-12)
        assert not got[i][~data.mask[i]].any()
