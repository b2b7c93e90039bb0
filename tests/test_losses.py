"""Independent reference tests for ``v3kit.train.losses``.

Every reference below is a deliberately slow, pure-Python loop over groups and
candidates (python floats + ``math``), written from the spec and compared with
the vectorised package code.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from v3kit.train import losses as L

NEG_INF = float("-inf")
DT = torch.float64


# ---------------------------------------------------------------------------
# pure-python references
# ---------------------------------------------------------------------------
def _mask_list(mask, B, G):
    if mask is None:
        return [[True] * G for _ in range(B)]
    return [[bool(x) for x in row] for row in mask.tolist()]


def ref_group_log_probs(q, c, temperature=1.0, mask=None):
    ql, cl = q.tolist(), c.tolist()
    B, G = len(cl), len(cl[0])
    m = _mask_list(mask, B, G)
    out = []
    for b in range(B):
        logits = [sum(x * y for x, y in zip(ql[b], cl[b][g])) / temperature for g in range(G)]
        valid = [g for g in range(G) if m[b][g]]
        mx = max(logits[g] for g in valid)
        lse = mx + math.log(sum(math.exp(logits[g] - mx) for g in valid))
        out.append([logits[g] - lse if m[b][g] else NEG_INF for g in range(G)])
    return out


def ref_rce_loss(q, c, labels, rewards, temperature, mask=None, label_weight=0.0, sim_temperature=1.0):
    lp = ref_group_log_probs(q, c, sim_temperature, mask)
    rl, ll = rewards.tolist(), labels.tolist()
    B, G = len(rl), len(rl[0])
    m = _mask_list(mask, B, G)
    total = 0.0
    for b in range(B):
        valid = [g for g in range(G) if m[b][g]]
        mx = max(rl[b][g] / temperature for g in valid)
        z = sum(math.exp(rl[b][g] / temperature - mx) for g in valid)
        s = 0.0
        for g in valid:
            w = math.exp(rl[b][g] / temperature - mx) / z
            t = label_weight * (1.0 if g == ll[b] else 0.0) + (1.0 - label_weight) * w
            s += t * lp[b][g]
        total += -s
    return total / B


def ref_zero_std(rewards, mask=None):
    rl = rewards.tolist()
    B, G = len(rl), len(rl[0])
    m = _mask_list(mask, B, G)
    out = []
    for b in range(B):
        vals = [rl[b][g] for g in range(G) if m[b][g]]
        out.append(len(vals) < 2 or all(v == vals[0] for v in vals))
    return out


def ref_group_advantages(rewards, mask=None, scale="group", eps=1e-4, baseline=0.0):
    rl = rewards.tolist()
    B, G = len(rl), len(rl[0])
    m = _mask_list(mask, B, G)
    sb = None
    if scale == "batch":
        allv = [rl[b][g] for b in range(B) for g in range(G) if m[b][g]]
        sb = statistics.stdev(allv)  # exact (rational arithmetic): no underflow for tiny spreads
    zs = ref_zero_std(rewards, mask)
    out = []
    for b in range(B):
        row = [0.0] * G
        if zs[b]:
            out.append(row)
            continue
        valid = [g for g in range(G) if m[b][g]]
        vals = [rl[b][g] for g in valid]
        n = len(vals)
        mu = sum(vals) / n
        if scale == "group":
            den = statistics.stdev(vals) + eps
        elif scale == "none":
            den = 1.0
        else:
            den = sb + eps
        for g in valid:
            row[g] = (rl[b][g] - mu) / den - baseline
        out.append(row)
    return out


def _kl_entry(lp, ol, rf, estimator):
    if estimator is None:
        if rf is None:
            d = lp - ol
            return math.exp(d) - 1.0 - d  # ratio - 1 - log(ratio)
        d = lp - rf
        return math.exp(-d) - 1.0 + d
    d = lp - (rf if rf is not None else ol)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d * d / 2.0
    if estimator == "k3":
        return math.exp(-d) - 1.0 + d
    if estimator == "seed":
        return math.exp(d) - 1.0 - d
    raise AssertionError(estimator)


def ref_grpo_loss(
    logp,
    old_logp,
    advantages,
    mask=None,
    eps_low=0.2,
    eps_high=None,
    kl_beta=0.1,
    ref_logp=None,
    kl_estimator=None,
    weights=None,
    dual_clip=None,
):
    eh = eps_low if eps_high is None else eps_high
    lpl, oll, al = logp.tolist(), old_logp.tolist(), advantages.tolist()
    rfl = None if ref_logp is None else ref_logp.tolist()
    wl = None if weights is None else weights.tolist()
    B, G = len(lpl), len(lpl[0])
    m = _mask_list(mask, B, G)
    num = pg_num = kl_num = wsum = 0.0
    nclip = nvalid = 0
    ratios = []
    ent_total = 0.0
    for b in range(B):
        ent = 0.0
        for g in range(G):
            if not m[b][g]:
                continue
            lp, ol, A = lpl[b][g], oll[b][g], al[b][g]
            rf = None if rfl is None else rfl[b][g]
            ratio = math.exp(max(-20.0, min(20.0, lp - ol)))
            clipped = min(max(ratio, 1.0 - eps_low), 1.0 + eh)
            obj = min(ratio * A, clipped * A)
            if dual_clip is not None and A < 0:
                obj = max(obj, dual_clip * A)
            pg = -obj
            kl = _kl_entry(lp, ol, rf, kl_estimator)
            w = 1.0 if wl is None else wl[b][g]
            num += w * (pg + kl_beta * kl)
            pg_num += w * pg
            kl_num += w * kl
            wsum += w
            nvalid += 1
            if (ratio < 1.0 - eps_low and A < 0) or (ratio > 1.0 + eh and A > 0):
                nclip += 1
            ratios.append(ratio)
            ent -= math.exp(lp) * lp
        ent_total += ent
    stats = {
        "pg_loss": pg_num / wsum,
        "kl": kl_num / wsum,
        "clip_ratio": nclip / nvalid,
        "ratio_mean": sum(ratios) / len(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "entropy": ent_total / B,
    }
    return num / wsum, stats


# ---------------------------------------------------------------------------
# helpers for random data
# ---------------------------------------------------------------------------
def ragged_mask(B, G, gen, min_valid=1, prefix=False):
    """Random boolean mask with a different number of valid entries per row."""
    rows = []
    for b in range(B):
        n = min_valid + (b % (G - min_valid + 1))  # deterministic spread of counts
        if prefix:
            idx = list(range(n))
        else:
            idx = torch.randperm(G, generator=gen)[:n].tolist()
        row = [False] * G
        for i in idx:
            row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def random_labels(mask, gen):
    labels = []
    for row in mask.tolist():
        valid = [g for g, v in enumerate(row) if v]
        labels.append(valid[int(torch.randint(len(valid), (1,), generator=gen))])
    return torch.tensor(labels, dtype=torch.long)


def _t(x):
    return torch.tensor(x, dtype=DT)


def _assert_stats(stats, ref_stats, rtol=1e-9, atol=1e-10):
    for key, val in ref_stats.items():
        assert key in stats, f"missing stat {key!r}"
        assert isinstance(stats[key], float), f"stat {key!r} is {type(stats[key])}, not a python float"
        assert math.isfinite(stats[key]), f"stat {key!r} = {stats[key]}"
        # clip_ratio is a count fraction (a miscount is off by >= 1/N), float32 rounding is fine there
        rt = 1e-6 if key == "clip_ratio" else rtol
        assert stats[key] == pytest.approx(val, rel=rt, abs=atol), f"stat {key!r}: got {stats[key]}, want {val}"


# ---------------------------------------------------------------------------
# group_log_probs
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("use_mask", [False, True])
def test_group_log_probs_matches_reference(temperature, use_mask):
    gen = torch.Generator().manual_seed(11)
    B, G, D = 5, 4, 3
    q = torch.randn(B, D, generator=gen, dtype=DT)
    c = torch.randn(B, G, D, generator=gen, dtype=DT)
    mask = ragged_mask(B, G, gen) if use_mask else None
    out = L.group_log_probs(q, c, temperature=temperature, mask=mask)
    assert out.shape == (B, G)
    assert_close(out, _t(ref_group_log_probs(q, c, temperature, mask)))


def test_group_log_probs_masked_entries_are_neg_inf_and_probs_sum_to_one():
    gen = torch.Generator().manual_seed(12)
    B, G, D = 6, 5, 4
    q = torch.randn(B, D, generator=gen, dtype=DT)
    c = torch.randn(B, G, D, generator=gen, dtype=DT)
    # huge garbage in masked candidates must not leak into valid ones
    mask = ragged_mask(B, G, gen)
    c = torch.where(mask.unsqueeze(-1), c, torch.full_like(c, 1e3))
    out = L.group_log_probs(q, c, temperature=0.7, mask=mask)
    assert torch.isneginf(out[~mask]).all()
    assert torch.isfinite(out[mask]).all()
    assert_close(out.exp().sum(-1), torch.ones(B, dtype=DT))
    # row with a single valid candidate -> log-prob exactly 0 there
    assert (mask.sum(-1) == 1).any()
    single = mask.sum(-1) == 1
    assert_close(out[single][mask[single]], torch.zeros(int(single.sum()), dtype=DT))


def test_group_log_probs_mask_none_equals_all_true():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(3, 2, generator=gen, dtype=DT)
    c = torch.randn(3, 4, 2, generator=gen, dtype=DT)
    a = L.group_log_probs(q, c, temperature=1.3)
    b = L.group_log_probs(q, c, temperature=1.3, mask=torch.ones(3, 4, dtype=torch.bool))
    assert_close(a, b)


def test_group_log_probs_temperature_scaling():
    gen = torch.Generator().manual_seed(14)
    q = torch.randn(4, 3, generator=gen, dtype=DT)
    c = torch.randn(4, 5, 3, generator=gen, dtype=DT)
    # dividing logits by T == scaling the query by 1/T
    assert_close(L.group_log_probs(q, c, temperature=0.25), L.group_log_probs(q / 0.25, c, temperature=1.0))
    # very large temperature -> uniform
    assert_close(L.group_log_probs(q, c, temperature=1e9), torch.full((4, 5), -math.log(5), dtype=DT))
    # hand example: q=[1,0], c=[[2,0],[0,0]], T=2 -> logits [1, 0] -> logp [1-log(1+e), -log(1+e)]
    q1 = _t([[1.0, 0.0]])
    c1 = _t([[[2.0, 0.0], [0.0, 0.0]]])
    lse = math.log(1 + math.e)
    assert_close(L.group_log_probs(q1, c1, temperature=2.0), _t([[1 - lse, -lse]]))


def test_group_log_probs_errors_name_the_argument():
    q = torch.randn(2, 3, dtype=DT)
    c = torch.randn(2, 4, 3, dtype=DT)
    bad_mask = torch.ones(2, 4, dtype=torch.bool)
    bad_mask[1] = False  # row with no valid candidate
    with pytest.raises(ValueError, match="mask"):
        L.group_log_probs(q, c, mask=bad_mask)
    with pytest.raises(ValueError, match="mask"):
        L.group_log_probs(q, c, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cand_emb|query_emb"):
        L.group_log_probs(q, torch.randn(2, 4, 5, dtype=DT))  # embedding dim mismatch
    with pytest.raises(ValueError, match="cand_emb|query_emb"):
        L.group_log_probs(q, torch.randn(3, 4, 3, dtype=DT))  # batch mismatch
    with pytest.raises(ValueError, match="cand_emb"):
        L.group_log_probs(q, torch.randn(2, 3, dtype=DT))  # cand_emb not 3-D


# ---------------------------------------------------------------------------
# rce_loss
# ---------------------------------------------------------------------------
def _rce_data(seed, B=5, G=4, D=3, masked=True):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen, dtype=DT)
    c = torch.randn(B, G, D, generator=gen, dtype=DT)
    r = torch.randn(B, G, generator=gen, dtype=DT)
    mask = ragged_mask(B, G, gen) if masked else None
    if mask is None:
        labels = torch.randint(G, (B,), generator=gen)
    else:
        labels = random_labels(mask, gen)
    return q, c, labels, r, mask


@pytest.mark.parametrize("label_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature,sim_temperature", [(1.0, 1.0), (2.0, 0.5), (0.5, 1.7)])
@pytest.mark.parametrize("masked", [False, True])
def test_rce_loss_matches_reference(label_weight, temperature, sim_temperature, masked):
    q, c, labels, r, mask = _rce_data(21, masked=masked)
    if mask is not None:
        r = torch.where(mask, r, torch.full_like(r, 1e6))  # finite garbage at masked positions
    loss = L.rce_loss(
        q, c, labels, r, temperature, mask=mask, label_weight=label_weight, sim_temperature=sim_temperature
    )
    assert loss.dim() == 0
    want = ref_rce_loss(q, c, labels, r, temperature, mask, label_weight, sim_temperature)
    assert math.isfinite(float(loss))
    assert_close(loss, torch.tensor(want, dtype=DT))


def test_rce_loss_special_cases():
    q, c, labels, r, mask = _rce_data(22, masked=True)
    lp = L.group_log_probs(q, c, 1.0, mask)
    # label_weight=1 is plain cross entropy on the label
    ce = -lp.gather(1, labels[:, None]).squeeze(1).mean()
    assert_close(L.rce_loss(q, c, labels, r, 3.0, mask=mask, label_weight=1.0), ce)
    # temperature -> 0 makes the reward target one-hot on the (unique) best valid reward
    best = torch.where(mask, r, torch.full_like(r, -1e30)).argmax(-1)
    ce_best = -lp.gather(1, best[:, None]).squeeze(1).mean()
    assert_close(L.rce_loss(q, c, labels, r, 1e-4, mask=mask), ce_best)
    # temperature -> inf makes it uniform over valid candidates
    unif = -(torch.where(mask, lp, torch.zeros_like(lp)).sum(-1) / mask.sum(-1)).mean()
    assert_close(L.rce_loss(q, c, labels, r, 1e9, mask=mask), unif)


def test_rce_loss_hand_example():
    # one group, q=[1,0], c=[[1,0],[0,0]] -> logits [1,0]; logp = [1-lse, -lse], lse = log(1+e)
    # rewards [0, log 3], T=1 -> w = [1/4, 3/4]; label_weight=0.5, label=0
    # t = [0.5 + 0.125, 0.375] = [0.625, 0.375]; loss = -(0.625*(1-lse) + 0.375*(-lse)) = lse - 0.625
    q = _t([[1.0, 0.0]])
    c = _t([[[1.0, 0.0], [0.0, 0.0]]])
    r = _t([[0.0, math.log(3.0)]])
    loss = L.rce_loss(q, c, torch.tensor([0]), r, 1.0, label_weight=0.5)
    assert_close(loss, torch.tensor(math.log(1 + math.e) - 0.625, dtype=DT))


def test_rce_loss_gradcheck():
    q, c, labels, r, mask = _rce_data(23, B=3, G=4, D=3, masked=True)
    q.requires_grad_(True)
    c.requires_grad_(True)

    def f(q_, c_):
        return L.rce_loss(q_, c_, labels, r, 1.5, mask=mask, label_weight=0.25, sim_temperature=0.8)

    assert torch.autograd.gradcheck(f, (q, c), eps=1e-6, atol=1e-6)


def test_rce_loss_grad_matches_reference_finite_differences():
    # gradient of the package's loss vs central differences of the pure-python reference
    q, c, labels, r, mask = _rce_data(24, B=3, G=3, D=2, masked=True)
    T, lw, ts = 0.7, 0.2, 1.3
    q = q.clone().requires_grad_(True)
    c = c.clone().requires_grad_(True)
    L.rce_loss(q, c, labels, r, T, mask=mask, label_weight=lw, sim_temperature=ts).backward()
    h = 1e-6
    for x, g in ((q, q.grad), (c, c.grad)):
        base = x.detach().clone()
        fd = torch.zeros_like(base)
        flat = fd.view(-1)
        for i in range(base.numel()):
            plus, minus = base.clone(), base.clone()
            plus.view(-1)[i] += h
            minus.view(-1)[i] -= h
            args_p = (plus, c.detach()) if x is q else (q.detach(), plus)
            args_m = (minus, c.detach()) if x is q else (q.detach(), minus)
            fp = ref_rce_loss(*args_p, labels, r, T, mask, lw, ts)
            fm = ref_rce_loss(*args_m, labels, r, T, mask, lw, ts)
            flat[i] = (fp - fm) / (2 * h)
        assert_close(g, fd, rtol=1e-5, atol=1e-7)
    # masked candidates get exactly zero gradient
    assert (c.grad[~mask] == 0).all()


def test_rce_loss_no_nan_grad_with_masks():
    q, c, labels, r, mask = _rce_data(25, B=6, G=5, D=4, masked=True)
    r = torch.where(mask, r, torch.full_like(r, 1e6))
    c = torch.where(mask.unsqueeze(-1), c, torch.full_like(c, 50.0))
    q.requires_grad_(True)
    c.requires_grad_(True)
    loss = L.rce_loss(q, c, labels, r, 0.5, mask=mask, label_weight=0.4)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(q.grad).all()
    assert torch.isfinite(c.grad).all()
    assert (c.grad[~mask] == 0).all()
    assert q.grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# group_advantages / zero_std_groups
# ---------------------------------------------------------------------------
def _adv_case():
    r = _t(
        [
            [1.0, 2.0, 4.0, 7.0],  # full group
            [0.5, 0.5, 0.5, 99.0],  # ties among valid (last masked) -> zero std
            [3.0, -1.0, 123.0, 55.0],  # only one valid candidate
            [0.1, 0.1, 0.1, 0.1],  # all equal, non-representable value
            [2.0, 2.0, 5.0, -8.0],  # ties but not all equal, ragged
            [0.0, 1.0, 0.0, 1.0],  # tied pairs
        ]
    )
    mask = torch.tensor(
        [
            [True, True, True, True],
            [True, True, True, False],
            [False, True, False, False],
            [True, True, True, True],
            [True, True, True, False],
            [True, True, True, True],
        ]
    )
    return r, mask


def test_zero_std_groups():
    r, mask = _adv_case()
    z = L.zero_std_groups(r, mask)
    assert z.dtype == torch.bool
    assert z.tolist() == [False, True, True, True, False, False]
    assert z.tolist() == ref_zero_std(r, mask)
    # without mask the garbage 99 makes row 1 non-constant, row 2 too
    assert L.zero_std_groups(r).tolist() == [False, False, False, True, False, False]
    # a group of size 1 is always zero-std
    assert L.zero_std_groups(_t([[3.0], [4.0]])).tolist() == [True, True]


def test_group_advantages_hand_example():
    # r = [1,2,4,7]: mean 3.5; deviations [-2.5,-1.5,0.5,3.5]; sum sq = 6.25+2.25+0.25+12.25 = 21
    # Bessel std = sqrt(21/3) = sqrt(7)
    r = _t([[1.0, 2.0, 4.0, 7.0]])
    s7 = math.sqrt(7.0)
    got = L.group_advantages(r, scale="group", eps=0.0)
    assert_close(got, _t([[-2.5 / s7, -1.5 / s7, 0.5 / s7, 3.5 / s7]]))
    got = L.group_advantages(r, scale="group")  # default eps = 1e-4
    assert_close(got, _t([[d / (s7 + 1e-4) for d in (-2.5, -1.5, 0.5, 3.5)]]))
    got = L.group_advantages(r, scale="none", baseline=0.5)
    assert_close(got, _t([[-3.0, -2.0, 0.0, 3.0]]))


def test_group_advantages_batch_scale_hand_example():
    # rows [0, 2] and [1, 5, 9 (masked)]; valid rewards {0,2,1,5}: mean 2, sq dev 4+0+1+9 = 14
    # batch Bessel std = sqrt(14/3). row0 centred: [-1, 1]; row1 centred: [-2, 2]
    r = _t([[0.0, 2.0, 0.0], [1.0, 5.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    sb = math.sqrt(14.0 / 3.0) + 1e-4
    got = L.group_advantages(r, mask, scale="batch")
    assert_close(got, _t([[-1 / sb, 1 / sb, 0.0], [-2 / sb, 2 / sb, 0.0]]))


@pytest.mark.parametrize("scale", ["group", "none", "batch"])
@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_group_advantages_matches_reference_fixed_case(scale, baseline):
    r, mask = _adv_case()
    got = L.group_advantages(r, mask, scale=scale, eps=1e-4, baseline=baseline)
    want = _t(ref_group_advantages(r, mask, scale, 1e-4, baseline))
    assert_close(got, want)
    # zero-signal groups and masked entries are exactly 0 (not just close)
    z = torch.tensor(ref_zero_std(r, mask))
    assert (got[z] == 0).all()
    assert (got[~mask] == 0).all()
    # ragged group 4 has signal, so the baseline is applied there
    assert got[4, :3].abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_group_advantages_random_matches_reference(seed, scale):
    gen = torch.Generator().manual_seed(100 + seed)
    B, G = 8, 5
    r = torch.randint(0, 4, (B, G), generator=gen).to(DT) / 2  # many ties
    r[0] = 1.5  # an all-equal row
    mask = ragged_mask(B, G, gen)
    r = torch.where(mask, r, torch.full_like(r, 1e6))
    baseline = 0.1 * seed
    got = L.group_advantages(r, mask, scale=scale, baseline=baseline)
    assert_close(got, _t(ref_group_advantages(r, mask, scale, 1e-4, baseline)))
    assert L.zero_std_groups(r, mask).tolist() == ref_zero_std(r, mask)
    assert (got[~mask] == 0).all()


def test_group_advantages_mask_none_equals_all_true_and_default_scale_is_group():
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(4, 6, generator=gen, dtype=DT)
    assert_close(L.group_advantages(r), L.group_advantages(r, torch.ones(4, 6, dtype=torch.bool), scale="group"))
    assert_close(L.group_advantages(r), _t(ref_group_advantages(r, None, "group")))


def test_group_advantages_unknown_scale_raises():
    with pytest.raises(ValueError, match="scale"):
        L.group_advantages(_t([[1.0, 2.0]]), scale="bogus")


# ---------------------------------------------------------------------------
# grpo_loss
# ---------------------------------------------------------------------------
def _clip_case():
    # (ratio, A) with eps_low=0.2, eps_high=0.3 -> trust region [0.8, 1.3]
    # [0,0] r=1.5  A=+1 : clipped high -> obj 1.3,  pg -1.3, counts as clipped
    # [0,1] r=1.5  A=-1 : obj min(-1.5,-1.3) = -1.5, pg 1.5, not counted
    # [0,2] r=0.5  A=-1 : clipped low -> obj -0.8, pg 0.8, counted
    # [1,0] r=0.5  A=+1 : obj min(0.5,0.8)=0.5, pg -0.5, not counted
    # [1,1] r=1.1  A=+2 : inside -> obj 2.2, pg -2.2
    # [1,2] r=1.25 A=+1 : inside the asymmetric region (would be clipped at 1.2 if eps_high=eps_low)
    ratios = [[1.5, 1.5, 0.5], [0.5, 1.1, 1.25]]
    adv = _t([[1.0, -1.0, -1.0], [1.0, 2.0, 1.0]])
    old = _t([[-1.0, -2.0, -0.5], [-1.5, -1.2, -0.7]])
    logp = old + torch.log(_t(ratios))
    return logp, old, adv


def test_grpo_loss_hand_example_asymmetric_clip():
    logp, old, adv = _clip_case()
    loss, stats = L.grpo_loss(logp, old, adv, eps_low=0.2, eps_high=0.3, kl_beta=0.0)
    # pg sum = -1.3 + 1.5 + 0.8 - 0.5 - 2.2 - 1.25 = -2.95
    assert_close(loss, torch.tensor(-2.95 / 6, dtype=DT))
    assert stats["pg_loss"] == pytest.approx(-2.95 / 6, rel=1e-9)
    assert stats["clip_ratio"] == pytest.approx(2 / 6, rel=1e-6)  # a count: 1e-6 still catches any miscount
    assert stats["ratio_min"] == pytest.approx(0.5, rel=1e-9)
    assert stats["ratio_max"] == pytest.approx(1.5, rel=1e-9)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.1 + 1.25) / 6, rel=1e-9)
    # symmetric (eps_high=None -> 0.2): entry [1,2] now clipped at 1.2 -> pg -1.2
    loss_sym, stats_sym = L.grpo_loss(logp, old, adv, eps_low=0.2, kl_beta=0.0)
    # entry [0,0] is clipped at 1.2 too -> pg sum = -1.2 + 1.5 + 0.8 - 0.5 - 2.2 - 1.2 = -2.8
    assert_close(loss_sym, torch.tensor(-2.8 / 6, dtype=DT))
    assert stats_sym["clip_ratio"] == pytest.approx(3 / 6, rel=1e-6)


def test_grpo_loss_hand_example_gradient_zero_when_clipped():
    logp, old, adv = _clip_case()
    logp = logp.clone().requires_grad_(True)
    loss, _ = L.grpo_loss(logp, old, adv, eps_low=0.2, eps_high=0.3, kl_beta=0.0)
    loss.backward()
    # d loss / d logp = -(ratio * A)/N where unclipped, 0 where the clip is active
    want = _t([[0.0, 1.5, 0.0], [-0.5, -2.2, -1.25]]) / 6
    assert_close(logp.grad, want)


def test_grpo_loss_dual_clip():
    # r=5, A=-1: min(-5, -1.3) = -5, dual clip c=3 -> max(-5, -3) = -3, pg 3 (vs 5 without)
    # r=5, A=+1: clipped high 1.3 -> pg -1.3 either way
    # r=2, A=-2: min(-4, -2.6) = -4; c*A = -6 -> unaffected, pg 4
    old = _t([[0.0, -1.0, -2.0]])
    logp = old + torch.log(_t([[5.0, 5.0, 2.0]]))
    adv = _t([[-1.0, 1.0, -2.0]])
    loss_nd, _ = L.grpo_loss(logp, old, adv, eps_low=0.2, eps_high=0.3, kl_beta=0.0)
    assert_close(loss_nd, torch.tensor((5.0 - 1.3 + 4.0) / 3, dtype=DT))
    lp = logp.clone().requires_grad_(True)
    loss_dc, st = L.grpo_loss(lp, old, adv, eps_low=0.2, eps_high=0.3, kl_beta=0.0, dual_clip=3.0)
    assert_close(loss_dc, torch.tensor((3.0 - 1.3 + 4.0) / 3, dtype=DT))
    assert st["pg_loss"] == pytest.approx((3.0 - 1.3 + 4.0) / 3, rel=1e-9)
    loss_dc.backward()
    # dual-clipped and clipped entries have zero pg gradient; [0,2] has -(r*A)/3 = 4/3
    assert_close(lp.grad, _t([[0.0, 0.0, 4.0 / 3]]))


def test_grpo_loss_kl_forms_hand_example():
    # logp - old = log 2 (ratio 2), A = 0 so pg = 0
    # seed: 2 - 1 - log2; with ref (logp - ref = log 2): k3 = 1/2 - 1 + log 2
    l2 = math.log(2.0)
    old = _t([[-1.0, -1.0]])
    logp = old + l2
    adv = torch.zeros(1, 2, dtype=DT)
    ref = logp - l2 * 0.5  # d = logp - ref = log2 / 2 for the ref-based forms
    d = l2 / 2
    seed = 2.0 - 1.0 - l2
    loss, st = L.grpo_loss(logp, old, adv, kl_beta=1.0)
    assert_close(loss, torch.tensor(seed, dtype=DT))
    assert st["kl"] == pytest.approx(seed, rel=1e-9)
    loss, st = L.grpo_loss(logp, old, adv, kl_beta=0.5, ref_logp=ref)
    assert st["kl"] == pytest.approx(math.exp(-d) - 1 + d, rel=1e-9)
    assert_close(loss, torch.tensor(0.5 * (math.exp(-d) - 1 + d), dtype=DT))
    # explicit estimators against old (no ref): d = log 2
    for est, val in [("k1", l2), ("k2", l2 * l2 / 2), ("k3", 0.5 - 1 + l2), ("seed", seed)]:
        _, st = L.grpo_loss(logp, old, adv, kl_beta=1.0, kl_estimator=est)
        assert st["kl"] == pytest.approx(val, rel=1e-9), est
    # explicit estimators against ref: d = log 2 / 2
    for est, val in [("k1", d), ("k2", d * d / 2), ("k3", math.exp(-d) - 1 + d), ("seed", math.exp(d) - 1 - d)]:
        _, st = L.grpo_loss(logp, old, adv, kl_beta=1.0, ref_logp=ref, kl_estimator=est)
        assert st["kl"] == pytest.approx(val, rel=1e-9), est


def _grpo_data(seed, B=5, G=4, masked=True):
    gen = torch.Generator().manual_seed(seed)
    old = torch.log_softmax(torch.randn(B, G, generator=gen, dtype=DT), -1)
    # log-ratios chosen away from log(0.8)=-0.223, log(1.2)=0.182, log(1.3)=0.262 and log(3)=1.099
    choices = _t([-0.6, -0.1, 0.0, 0.05, 0.1, 0.6, 1.5])
    # enumerate (log-ratio, sign of A) pairs so every clip region occurs, then shuffle positions
    n = B * G
    idx = torch.arange(n)
    perm = torch.randperm(n, generator=gen)
    delta = choices[idx % len(choices)][perm].view(B, G)
    sign = (1.0 - 2.0 * ((idx // len(choices)) % 2)).to(DT)[perm].view(B, G)
    logp = old + delta
    adv = sign * (0.2 + torch.rand(B, G, generator=gen, dtype=DT))
    ref = old + 0.3 * torch.randn(B, G, generator=gen, dtype=DT)
    weights = torch.rand(B, G, generator=gen, dtype=DT) + 0.1
    mask = ragged_mask(B, G, gen) if masked else None
    return logp, old, adv, ref, weights, mask


GRPO_CONFIGS = [
    dict(),
    dict(eps_low=0.2, eps_high=0.3),
    dict(eps_low=0.2, eps_high=0.3, dual_clip=3.0),
    dict(kl_beta=0.0),
    dict(kl_beta=0.05, use_ref=True),
    dict(kl_estimator="k1", use_ref=True),
    dict(kl_estimator="k2", use_ref=True),
    dict(kl_estimator="k3", use_ref=True),
    dict(kl_estimator="k1"),
    dict(kl_estimator="k2"),
    dict(kl_estimator="k3"),
    dict(kl_estimator="seed", use_ref=True),
    dict(use_weights=True),
    dict(use_weights=True, eps_high=0.3, dual_clip=2.5, use_ref=True),
]


def _split_cfg(cfg, ref, weights):
    cfg = dict(cfg)
    kw = {}
    if cfg.pop("use_ref", False):
        kw["ref_logp"] = ref
    if cfg.pop("use_weights", False):
        kw["weights"] = weights
    kw.update(cfg)
    return kw


@pytest.mark.parametrize("cfg", GRPO_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("masked", [False, True])
def test_grpo_loss_matches_reference(cfg, masked):
    logp, old, adv, ref, weights, mask = _grpo_data(31, masked=masked)
    kw = _split_cfg(cfg, ref, weights)
    if mask is not None:
        # garbage at masked positions must be ignored (finite here; -inf checked separately)
        logp = torch.where(mask, logp, torch.full_like(logp, 5.0))
        old = torch.where(mask, old, torch.full_like(old, -5.0))
        adv = torch.where(mask, adv, torch.full_like(adv, 1e3))
        if "weights" in kw:
            kw["weights"] = torch.where(mask, weights, torch.full_like(weights, 1e3))
    loss, stats = L.grpo_loss(logp, old, adv, mask=mask, **kw)
    want_loss, want_stats = ref_grpo_loss(logp, old, adv, mask=mask, **kw)
    assert loss.dim() == 0
    assert_close(loss, torch.tensor(want_loss, dtype=DT))
    _assert_stats(stats, want_stats)


def test_grpo_loss_random_covers_every_clip_region():
    # sanity of the random data used above: all four (ratio region, sign of A) cells occur
    logp, old, adv, *_ = _grpo_data(31, masked=False)
    r = (logp - old).exp()
    assert ((r > 1.3) & (adv > 0)).any() and ((r > 1.3) & (adv < 0)).any()
    assert ((r < 0.8) & (adv > 0)).any() and ((r < 0.8) & (adv < 0)).any()
    assert ((r > 3.0) & (adv < 0)).any()
    _, st = L.grpo_loss(logp, old, adv, eps_high=0.3)
    assert 0 < st["clip_ratio"] < 1


def test_grpo_loss_weights_hand_example():
    # ratio 1 everywhere, kl 0 -> pg = -A. weights [1, 3], A [2, -1]: (1*-2 + 3*1)/4 = 0.25
    old = _t([[-0.5, -1.0]])
    adv = _t([[2.0, -1.0]])
    loss, st = L.grpo_loss(old.clone(), old, adv, weights=_t([[1.0, 3.0]]))
    assert_close(loss, torch.tensor(0.25, dtype=DT))
    assert st["pg_loss"] == pytest.approx(0.25, rel=1e-9)
    assert st["ratio_mean"] == pytest.approx(1.0) and st["clip_ratio"] == 0.0


def test_grpo_loss_entropy_stat():
    # group 0: p = [0.5, 0.25, 0.25] -> H = 1.5 log 2; group 1: [0.5, 0.5, masked] -> H = log 2
    # mean over groups = 1.25 log 2
    logp = torch.log(_t([[0.5, 0.25, 0.25], [0.5, 0.5, 1.0]]))
    logp[1, 2] = NEG_INF
    old = logp.clone()
    old[1, 2] = NEG_INF
    mask = torch.tensor([[True, True, True], [True, True, False]])
    _, st = L.grpo_loss(logp, old, torch.zeros(2, 3, dtype=DT), mask=mask)
    assert st["entropy"] == pytest.approx(1.25 * math.log(2.0), rel=1e-9)


def test_grpo_loss_log_ratio_clamped():
    old = _t([[0.0, 0.0]])
    logp = _t([[30.0, -30.0]])
    _, st = L.grpo_loss(logp - 31.0, old - 31.0, torch.zeros(1, 2, dtype=DT), kl_beta=0.0)
    assert st["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-9)
    assert st["ratio_min"] == pytest.approx(math.exp(-20.0), rel=1e-9)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(eps_low=0.2, eps_high=0.3, dual_clip=3.0, use_ref=True),
        dict(kl_estimator="k2", use_ref=True, use_weights=True),
        dict(kl_estimator="k3", eps_high=0.3),
        dict(kl_estimator="k1", use_ref=True),
    ],
    ids=str,
)
def test_grpo_loss_gradcheck(cfg):
    logp, old, adv, ref, weights, mask = _grpo_data(41, B=3, G=4, masked=True)
    kw = _split_cfg(cfg, ref, weights)
    logp = logp.clone().requires_grad_(True)

    def f(lp):
        return L.grpo_loss(lp, old, adv, mask=mask, **kw)[0]

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-6)


def test_grpo_loss_grad_matches_reference_finite_differences():
    logp, old, adv, ref, weights, mask = _grpo_data(42, B=3, G=4, masked=True)
    kw = dict(eps_low=0.2, eps_high=0.3, dual_clip=3.0, ref_logp=ref, weights=weights, kl_beta=0.2)
    lp = logp.clone().requires_grad_(True)
    L.grpo_loss(lp, old, adv, mask=mask, **kw)[0].backward()
    h = 1e-6
    fd = torch.zeros_like(logp)
    for i in range(logp.numel()):
        p, m_ = logp.clone(), logp.clone()
        p.view(-1)[i] += h
        m_.view(-1)[i] -= h
        fd.view(-1)[i] = (ref_grpo_loss(p, old, adv, mask, **kw)[0] - ref_grpo_loss(m_, old, adv, mask, **kw)[0]) / (
            2 * h
        )
    assert_close(lp.grad, fd, rtol=1e-5, atol=1e-7)
    assert (lp.grad[~mask] == 0).all()


@pytest.mark.parametrize("kl_estimator", [None, "k1", "k2", "k3", "seed"])
@pytest.mark.parametrize("use_ref", [False, True])
def test_grpo_loss_no_nan_with_neg_inf_at_masked(kl_estimator, use_ref):
    logp, old, adv, ref, weights, mask = _grpo_data(43, B=5, G=4, masked=True)
    inf = torch.full_like(logp, NEG_INF)
    logp = torch.where(mask, logp, inf).requires_grad_(True)
    old = torch.where(mask, old, inf)
    ref = torch.where(mask, ref, inf)
    kw = dict(
        ref_logp=ref if use_ref else None, kl_estimator=kl_estimator, weights=weights, dual_clip=3.0, eps_high=0.3
    )
    loss, stats = L.grpo_loss(logp, old, adv, mask=mask, **kw)
    assert torch.isfinite(loss)
    for k, v in stats.items():
        assert math.isfinite(v), f"stat {k} = {v}"
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    assert logp.grad[mask].abs().sum() > 0
    # values agree with the reference on the valid entries
    want, want_stats = ref_grpo_loss(logp.detach(), old, adv, mask, **kw)
    assert_close(loss.detach(), torch.tensor(want, dtype=DT))
    _assert_stats(stats, want_stats)


def test_grpo_loss_end_to_end_grad_through_embeddings_no_nan():
    # masked -inf log-probs produced by group_log_probs flow into grpo_loss
    gen = torch.Generator().manual_seed(44)
    B, G, D = 4, 5, 3
    q = torch.randn(B, D, generator=gen, dtype=DT, requires_grad=True)
    c = torch.randn(B, G, D, generator=gen, dtype=DT)
    mask = ragged_mask(B, G, gen)
    r = torch.randn(B, G, generator=gen, dtype=DT)
    old = L.group_log_probs(q.detach() + 0.1, c, 1.0, mask)
    ref = L.group_log_probs(q.detach() - 0.1, c, 1.0, mask)
    logp = L.group_log_probs(q, c, 1.0, mask)
    adv = L.group_advantages(r, mask)
    loss, stats = L.grpo_loss(logp, old, adv, mask=mask, ref_logp=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    assert q.grad.abs().sum() > 0
    want, want_stats = ref_grpo_loss(logp.detach(), old, adv, mask, ref_logp=ref)
    assert_close(loss.detach(), torch.tensor(want, dtype=DT))
    _assert_stats(stats, want_stats)


def test_group_advantages_treat_an_empty_group_as_no_signal():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [7.0, 7.0, 7.0]], dtype=DT)
    mask = torch.tensor([[True, True, True], [False, False, False]])
    for scale in ("group", "batch", "none"):
        adv = L.group_advantages(rewards, mask, scale=scale, baseline=0.3)
        assert torch.isfinite(adv).all() and (adv[1] == 0).all()
        assert_close(adv[0], L.group_advantages(rewards[:1], mask[:1], scale=scale, baseline=0.3)[0])
    assert L.zero_std_groups(rewards, mask).tolist() == [False, True]


@pytest.mark.parametrize("dtype, d", [(torch.float64, 2.66e-174), (torch.float32, 1e-25)])
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_advantages_of_a_spread_whose_square_underflows(dtype, d, scale):
    """Two rewards d apart, d so small that d**2 underflows to 0: at eps=0 the z-scores are still -+1/sqrt(2)
    (hand-derived: centred -+d/2, Bessel std d/sqrt(2)), not -+inf."""
    rewards = torch.tensor([[0.0, d], [1.0, 1.0]], dtype=dtype)
    mask = torch.tensor([[True, True], [False, False]])
    adv = L.group_advantages(rewards, mask, scale=scale, eps=0.0)
    want = torch.tensor([[-(0.5**0.5), 0.5**0.5], [0.0, 0.0]], dtype=dtype)
    assert_close(adv, want)
