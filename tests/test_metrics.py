"""Independent reference tests for ``v3kit.train.metrics.ranking_metrics``.

The reference is a slow pure-Python loop over groups and candidates written
from the spec; hand-worked examples pin the exact numbers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from v3kit.train.metrics import member_ranking_metrics, ranking_metrics

DT = torch.float64
L2_3 = math.log2(3.0)  # log2(i + 2) for i = 1


# ---------------------------------------------------------------------------
# pure-python reference
# ---------------------------------------------------------------------------
def ref_ranking_metrics(scores, labels, rewards, mask=None, k=5, utility=None, logp=None, ref_logp=None):
    s, r, lab = scores.tolist(), rewards.tolist(), labels.tolist()
    B, G = len(s), len(s[0])
    m = [[True] * G for _ in range(B)] if mask is None else mask.tolist()
    u = None if utility is None else utility.tolist()
    acc = mrr = rew = reg = util = kl = 0.0
    ndcgs = []
    for b in range(B):
        valid = [g for g in range(G) if m[b][g]]
        y = lab[b]
        # Ties are broken uniformly at random: enumerate every order of the valid candidates that sorts the
        # scores (NaN = -inf) non-increasingly; each is equally likely, so every top-1/rank metric is their mean.
        key = [float("-inf") if math.isnan(x) else x for x in s[b]]
        orders = [
            o for o in itertools.permutations(valid) if all(key[o[i]] >= key[o[i + 1]] for i in range(len(o) - 1))
        ]
        acc += sum(o[0] == y for o in orders) / len(orders)
        mrr += sum(1.0 / (1 + o.index(y)) for o in orders) / len(orders)
        r_top = sum(r[b][o[0]] for o in orders) / len(orders)
        rmin = min(r[b][g] for g in valid)
        rmax = max(r[b][g] for g in valid)
        gain = {g: r[b][g] - rmin for g in valid}
        order = sorted(valid, key=lambda g: (-key[g], g))  # ndcg: ties go to the lower index
        dcg = sum(gain[g] / math.log2(i + 2) for i, g in enumerate(order[:k]))
        ideal = sorted(gain.values(), reverse=True)
        idcg = sum(v / math.log2(i + 2) for i, v in enumerate(ideal[:k]))
        if idcg > 0:
            ndcgs.append(dcg / idcg)
        rew += r_top
        reg += rmax - r_top
        if u is not None:
            util += sum(u[b][o[0]] for o in orders) / len(orders)
        if logp is not None and ref_logp is not None:
            lp, rl = logp.tolist(), ref_logp.tolist()
            kl += sum(math.exp(lp[b][g]) * (lp[b][g] - rl[b][g]) for g in valid)
    out = {
        "acc@1": acc / B,
        "mrr": mrr / B,
        f"ndcg@{k}": sum(ndcgs) / len(ndcgs) if ndcgs else 1.0,
        "reward@1": rew / B,
        "regret@1": reg / B,
    }
    if u is not None:
        out["utility@1"] = util / B
    if logp is not None and ref_logp is not None:
        out["kl_to_sft"] = kl / B
    return out


def _ndcg(res, k):
    """The spec names the key ``ndcg@k``; accept the literal or the formatted form."""
    key = f"ndcg@{k}"
    if key in res:
        return res[key]
    assert "ndcg@k" in res, f"no ndcg key in {sorted(res)}"
    return res["ndcg@k"]


def _check(res, want, rel=1e-9, abs_=1e-12):
    for key, val in want.items():
        got = _ndcg(res, key.split("@")[1]) if key.startswith("ndcg@") else res[key]
        assert isinstance(got, float), f"{key} is {type(got)}, not a python float"
        # acc@1 is a count fraction (a miscount is off by >= 1/B): float32 rounding is tolerated there
        rt = max(rel, 1e-6) if key == "acc@1" else rel
        assert got == pytest.approx(val, rel=rt, abs=abs_), f"{key}: got {got}, want {val}"


# ---------------------------------------------------------------------------
# hand-worked example
# ---------------------------------------------------------------------------
def _hand_case():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3],
            [0.2, 0.2, 0.1, 5.0],  # last masked despite the highest score
            [0.3, 0.7, 9.0, 9.0],  # last two masked
        ],
        dtype=DT,
    )
    rewards = torch.tensor(
        [
            [0.0, 1.0, 3.0, 2.0],
            [1.0, 2.0, 2.0, 100.0],
            [0.5, 0.5, 7.0, 7.0],
        ],
        dtype=DT,
    )
    mask = torch.tensor(
        [
            [True, True, True, True],
            [True, True, True, False],
            [True, True, False, False],
        ]
    )
    labels = torch.tensor([2, 1, 1])
    return scores, labels, rewards, mask


# Group 0: top1 = 1 (0.9), label 2 -> miss. Label score 0.5, one score (0.9) above -> rank 2, RR 1/2.
#   reward@1 = 1, max = 3 -> regret 2. gains = r - 0 = [0,1,3,2]; ranked by score: idx 1,2,3,0 -> gains 1,3,2,0
#   DCG@5 = 1/1 + 3/log2(3) + 2/2 + 0 = 2 + 3/log2 3;  IDCG@5 = 3 + 2/log2 3 + 1/2 + 0 = 3.5 + 2/log2 3
#   DCG@2 = 1 + 3/log2 3;  IDCG@2 = 3 + 2/log2 3
# Group 1 (valid 0..2): scores tie 0.2, 0.2 (candidates 0 and label 1): each is first half the time ->
#   acc 1/2, RR (1 + 1/2) / 2 = 3/4, reward@1 = (1 + 2) / 2 = 1.5, max valid = 2 -> regret 0.5.
#   ndcg breaks the tie by the lower index: gains = r - 1 = [0,1,1]; order 0,1,2 -> gains 0,1,1
#   DCG@5 = 0 + 1/log2 3 + 1/2;  IDCG@5 = 1 + 1/log2 3 + 0.   @2: DCG = 1/log2 3, IDCG = 1 + 1/log2 3
# Group 2 (valid 0..1): top1 = 1 = label -> hit, RR 1. reward 0.5, regret 0. all gains 0 -> IDCG 0 -> excluded.
G0_NDCG5 = (2 + 3 / L2_3) / (3.5 + 2 / L2_3)
G1_NDCG5 = (1 / L2_3 + 0.5) / (1 + 1 / L2_3)
G0_NDCG2 = (1 + 3 / L2_3) / (3 + 2 / L2_3)
G1_NDCG2 = (1 / L2_3) / (1 + 1 / L2_3)


def test_hand_example_k5():
    scores, labels, rewards, mask = _hand_case()
    res = ranking_metrics(scores, labels, rewards, mask, k=5)
    want = {
        "acc@1": (0 + 0.5 + 1) / 3,
        "mrr": (0.5 + 0.75 + 1) / 3,
        "ndcg@5": (G0_NDCG5 + G1_NDCG5) / 2,
        "reward@1": (1 + 1.5 + 0.5) / 3,
        "regret@1": (2 + 0.5 + 0) / 3,
    }
    _check(res, want)
    # the hand numbers agree with the loop reference
    _check(res, ref_ranking_metrics(scores, labels, rewards, mask, k=5))
    assert "utility@1" not in res
    assert "kl_to_sft" not in res


def test_hand_example_k2_and_default_k():
    scores, labels, rewards, mask = _hand_case()
    res = ranking_metrics(scores, labels, rewards, mask, k=2)
    assert _ndcg(res, 2) == pytest.approx((G0_NDCG2 + G1_NDCG2) / 2, rel=1e-9)
    res_default = ranking_metrics(scores, labels, rewards, mask)
    assert _ndcg(res_default, 5) == pytest.approx((G0_NDCG5 + G1_NDCG5) / 2, rel=1e-9)


def test_hand_example_utility_and_kl():
    scores, labels, rewards, mask = _hand_case()
    utility = torch.tensor([[9.0, 4.0, 1.0, 0.0], [2.0, 8.0, 8.0, 1e6], [1.0, 3.0, 1e6, 1e6]], dtype=DT)
    # top-1 per group: 1, {0 or 1 tied}, 1 -> utilities 4, (2 + 8) / 2, 3 -> mean 4
    res = ranking_metrics(scores, labels, rewards, mask, utility=utility)
    assert res["utility@1"] == pytest.approx(4.0, rel=1e-12)
    assert "kl_to_sft" not in res
    # kl_to_sft = mean over groups of sum_{valid c} exp(lp)(lp - ref), masked entries -inf in both
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.5, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=DT))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.25, 0.5, 0.25, 1.0], [0.5, 0.5, 1.0, 1.0]], dtype=DT))
    lp[1, 3] = float("-inf")
    ref[1, 3] = float("-inf")
    lp[2, 2:] = float("-inf")
    lp[2, :2] = math.log(0.5)
    ref[2, 2:] = float("-inf")
    # group 0: .5*log2 + .25*0 + .125*log(.5) + .125*log(.5) = .5 log2 - .25 log2 = .25 log2
    # group 1 (valid 0,1,2): .5*log(.5/.25) + .5*log(.5/.5) + 1.0*log(1/.25) = .5 log2 + 2 log2 = 2.5 log2
    #   (lp isn't normalised there on purpose: the formula is just sum exp(lp)(lp - ref))
    # group 2 (valid 0,1): .5*0 + .5*0 = 0           -> mean = (0.25 + 2.5 + 0)/3 log2
    res = ranking_metrics(scores, labels, rewards, mask, logp=lp, ref_logp=ref)
    assert "utility@1" not in res
    assert res["kl_to_sft"] == pytest.approx(2.75 / 3 * math.log(2.0), rel=1e-9)
    # only one of logp/ref_logp -> no kl
    assert "kl_to_sft" not in ranking_metrics(scores, labels, rewards, mask, logp=lp)
    assert "kl_to_sft" not in ranking_metrics(scores, labels, rewards, mask, ref_logp=ref)


def test_mask_none_equals_all_true():
    scores, labels, rewards, _ = _hand_case()
    a = ranking_metrics(scores, labels, rewards)
    b = ranking_metrics(scores, labels, rewards, torch.ones(3, 4, dtype=torch.bool))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    # unmasked, group 1's 4th candidate (score 5, reward 100) wins -> regret 0 there, reward 100
    _check(a, ref_ranking_metrics(scores, labels, rewards))
    assert a["reward@1"] == pytest.approx((1 + 100 + 7) / 3, rel=1e-12)  # group 2 top1 = idx 2 (first of the 9s)


def test_all_ties_are_broken_at_random_and_ndcg_is_one():
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]], dtype=DT)
    rewards = torch.tensor([[3.0, 3.0, 3.0], [4.0, 5.0, 6.0]], dtype=DT)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    labels = torch.tensor([2, 2])
    res = ranking_metrics(scores, labels, rewards, mask)
    # group 0: three tied -> the label is at position 1, 2 or 3 with equal odds: acc 1/3, RR (1 + 1/2 + 1/3) / 3,
    #   reward 3, regret 0. IDCG 0 -> excluded.
    # group 1 (valid 0, 2): top1 = 2 = label -> hit, rank 1, reward 6, regret 0.
    #   gains [0, -, 2]; ranked 2, 0 -> DCG = 2 = IDCG -> ndcg 1
    _check(
        res,
        {
            "acc@1": (1 / 3 + 1) / 2,
            "mrr": ((1 + 1 / 2 + 1 / 3) / 3 + 1) / 2,
            "ndcg@5": 1.0,
            "reward@1": 4.5,
            "regret@1": 0.0,
        },
    )
    # every group has IDCG 0 -> ndcg is 1.0 by convention
    res = ranking_metrics(scores, labels, torch.full_like(rewards, 2.0), mask)
    assert _ndcg(res, 5) == 1.0


def test_single_valid_candidate_groups():
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, 1.0, 2.0]], dtype=DT)
    rewards = torch.tensor([[1.0, 9.0, 2.0], [1.0, 3.0, 2.0]], dtype=DT)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    labels = torch.tensor([0, 1])
    res = ranking_metrics(scores, labels, rewards, mask, k=1)
    # group 0: only candidate 0 -> top1 = label, rank 1, reward 1, regret 0, IDCG 0 (excluded)
    # group 1: top1 = 0 (3.0), label 1 has score 1 with two above -> rank 3; reward 1, regret 2
    #   gains [0,2,1]; DCG@1 = gain[0] = 0; IDCG@1 = 2 -> ndcg 0
    _check(res, {"acc@1": 0.5, "mrr": (1 + 1 / 3) / 2, "ndcg@1": 0.0, "reward@1": 1.0, "regret@1": 1.0})


# ---------------------------------------------------------------------------
# randomized comparison with the loop reference
# ---------------------------------------------------------------------------
def _random_case(seed, B=7, G=5, ties=True):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        scores = torch.randint(0, 4, (B, G), generator=gen).to(DT) / 2
        rewards = torch.randint(0, 3, (B, G), generator=gen).to(DT)
    else:
        scores = torch.randn(B, G, generator=gen, dtype=DT)
        rewards = torch.randn(B, G, generator=gen, dtype=DT)
    rows = []
    for b in range(B):
        n = 1 + b % G
        idx = torch.randperm(G, generator=gen)[:n].tolist()
        rows.append([g in idx for g in range(G)])
    mask = torch.tensor(rows)
    labels = []
    for row in rows:
        valid = [g for g, v in enumerate(row) if v]
        labels.append(valid[int(torch.randint(len(valid), (1,), generator=gen))])
    labels = torch.tensor(labels)
    # garbage at masked positions that would change every metric if it leaked
    scores = torch.where(mask, scores, torch.full_like(scores, 1e3))
    rewards = torch.where(mask, rewards, torch.full_like(rewards, -1e3))
    utility = torch.randn(B, G, generator=gen, dtype=DT)
    logp = torch.log_softmax(
        torch.where(mask, torch.randn(B, G, generator=gen, dtype=DT), torch.full((B, G), float("-inf"), dtype=DT)), -1
    )
    ref = torch.log_softmax(
        torch.where(mask, torch.randn(B, G, generator=gen, dtype=DT), torch.full((B, G), float("-inf"), dtype=DT)), -1
    )
    return scores, labels, rewards, mask, utility, logp, ref


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("ties", [True, False])
def test_random_matches_reference(seed, k, ties):
    scores, labels, rewards, mask, utility, logp, ref = _random_case(seed, ties=ties)
    res = ranking_metrics(scores, labels, rewards, mask, k=k, utility=utility, logp=logp, ref_logp=ref)
    want = ref_ranking_metrics(scores, labels, rewards, mask, k=k, utility=utility, logp=logp, ref_logp=ref)
    for key, val in res.items():
        assert isinstance(val, float) and math.isfinite(val), f"{key} = {val!r}"
    _check(res, want, rel=1e-7, abs_=1e-9)
    assert res["kl_to_sft"] >= -1e-12  # KL of normalised distributions is non-negative


def test_random_full_batch_without_mask():
    gen = torch.Generator().manual_seed(99)
    B, G = 16, 6
    scores = torch.randn(B, G, generator=gen, dtype=DT)
    rewards = torch.randn(B, G, generator=gen, dtype=DT)
    labels = torch.randint(G, (B,), generator=gen)
    res = ranking_metrics(scores, labels, rewards, k=3)
    _check(res, ref_ranking_metrics(scores, labels, rewards, k=3), rel=1e-7, abs_=1e-9)
    # scoring by the rewards themselves is perfect on every reward metric
    res = ranking_metrics(rewards, labels, rewards, k=3)
    _check(res, {"ndcg@3": 1.0, "regret@1": 0.0, "reward@1": rewards.max(-1).values.mean().item()}, rel=1e-9)


# ---------------------------------------------------------------------------
# ties and NaN: a collapsed model is a random ranker, never a perfect one
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("G", [2, 3, 5, 8])
@pytest.mark.parametrize("score", [0.0, float("nan")])
def test_all_equal_or_nan_scores_score_as_a_random_ranker(G, score):
    B = 4
    scores = torch.full((B, G), score, dtype=DT)
    labels = torch.arange(B) % G
    rewards = torch.arange(B * G, dtype=DT).reshape(B, G)
    res = ranking_metrics(scores, labels, rewards)
    harmonic = sum(1 / i for i in range(1, G + 1))
    _check(res, {"acc@1": 1 / G, "mrr": harmonic / G, "reward@1": rewards.mean().item(), "regret@1": (G - 1) / 2})


def test_nan_label_score_ranks_below_every_real_score():
    scores = torch.tensor([[float("nan"), 0.3, -5.0], [1.0, float("nan"), float("nan")]], dtype=DT)
    rewards = torch.tensor([[9.0, 1.0, 0.0], [1.0, 2.0, 3.0]], dtype=DT)
    labels = torch.tensor([0, 1])
    res = ranking_metrics(scores, labels, rewards)
    # group 0: label NaN -> last of 3 -> RR 1/3, top1 = candidate 1 (reward 1, regret 8)
    # group 1: label NaN, tied with the other NaN below 1.0 -> position 2 or 3: RR (1/2 + 1/3) / 2; top1 = 0
    _check(res, {"acc@1": 0.0, "mrr": (1 / 3 + (1 / 2 + 1 / 3) / 2) / 2, "reward@1": 1.0, "regret@1": 5.0})
    _check(res, ref_ranking_metrics(scores, labels, rewards))


def test_ndcg_with_a_subnormal_ideal_dcg():
    """Rewards 2.2e-313 apart (found by the property tests): the ideal DCG is subnormal but > 0, and a ranking that
    puts the better candidate first (the tie goes to the lower index) is ideal, so ndcg@1 = 1."""
    scores = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, -2.2250738585e-313]], dtype=torch.float64)
    got = ranking_metrics(scores, torch.tensor([0]), rewards, k=1)
    assert got["ndcg@1"] == 1.0


def test_a_frozen_reference_is_scored_once(monkeypatch):
    """evaluate() reuses the model's log-probs when the reference is the model itself, and the stage table scores
    the reference once for every stage; the metrics are those of scoring it every time."""
    from v3kit import pipeline as P
    from v3kit.data.synthetic import SyntheticConfig, make_world
    from v3kit.train import metrics as M
    from v3kit.train.model import ModelConfig, build_model

    data = make_world(SyntheticConfig(n_queries=40, seed=3))
    torch.manual_seed(0)
    sft, other = (build_model(ModelConfig(), data.query_dim, data.cand_dim) for _ in range(2))
    want = {name: M.evaluate(m, data, reference=sft) for name, m in (("sft", sft), ("rce", other))}
    calls = []
    real = M.compute_log_probs
    monkeypatch.setattr(M, "compute_log_probs", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    monkeypatch.setattr(P, "compute_log_probs", M.compute_log_probs)
    assert M.evaluate(sft, data, reference=sft) == want["sft"] and calls == [sft]
    calls.clear()
    table = P.stage_table({"sft": sft, "rce": other}, data, sft, 1.0)
    assert sum(m is sft for m in calls) == 2  # the reference once, plus the "sft" row's own model pass
    for name in want:
        assert table.loc[name].to_dict() == pytest.approx(want[name], rel=0, abs=0)


def test_member_ranking_metrics_equal_ranking_metrics_member_by_member():
    """The stacked trainer's evaluation: K members' metrics in one pass equal K calls of ranking_metrics (ragged
    groups, ties, groups without an ideal DCG, utility and the KL to a reference included)."""
    g = torch.Generator().manual_seed(0)
    k, n, size = 3, 40, 6
    scores = torch.randn(k, n, size, generator=g)
    scores[:, :5] = scores[:, :5].round()  # ties
    mask = torch.rand(n, size, generator=g) > 0.2
    mask[:, 0] = True
    labels = torch.zeros(n, dtype=torch.long)
    rewards = torch.randn(n, size, generator=g)
    rewards[:4] = 1.0  # all equal: ndcg undefined for these groups
    utility = torch.rand(n, size, generator=g)
    logp = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    ref = torch.log_softmax(torch.randn(k, n, size, generator=g).masked_fill(~mask, float("-inf")), dim=-1)
    got = member_ranking_metrics(logp, labels, rewards, mask, utility=utility, ref_logp=ref)
    for j in range(k):
        want = ranking_metrics(logp[j], labels, rewards, mask, utility=utility, logp=logp[j], ref_logp=ref[j])
        assert list(got[j]) == list(want)
        for name in want:
            assert got[j][name] == pytest.approx(want[name], rel=1e-6, abs=1e-7), name
    assert (
        member_ranking_metrics(logp, labels, rewards, mask)[0].keys()
        == ranking_metrics(logp[0], labels, rewards, mask, logp=logp[0]).keys()
    )
