"""Data contract: long-form loading, validation errors that name the field, and the split."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from v3kit.data import DataValidationError, GroupData, from_long_frame, split_by_query, to_long_frame
from v3kit.data.synthetic import SyntheticConfig, make_world
from v3kit.data.tables import load_groups


def long_frame() -> pd.DataFrame:
    """Two queries: q1 with 3 candidates (label c2), q2 with 2 candidates (label c0)."""
    rows = []
    for qid, n, label in (("q1", 3, 2), ("q2", 2, 0)):
        for c in range(n):
            rows.append(
                {
                    "query_id": qid,
                    "candidate_id": f"{qid}-c{c}",
                    "query_features": [1.0, 2.0] if qid == "q1" else [3.0, 4.0],
                    "candidate_features": [float(c), 0.5, -1.0],
                    "reward": 0.1 * c,
                    "is_label": c == label,
                }
            )
    return pd.DataFrame(rows)


def test_long_frame_to_padded_groups():
    d = from_long_frame(long_frame())
    assert d.query_ids == ["q1", "q2"]
    assert d.cand_x.shape == (2, 3, 3) and d.query_x.shape == (2, 2)
    assert d.mask.tolist() == [[True, True, True], [True, True, False]]
    assert d.labels.tolist() == [2, 0]
    torch.testing.assert_close(d.rewards, torch.tensor([[0.0, 0.1, 0.2], [0.0, 0.1, 0.0]]))
    assert d.utility is None


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_file_round_trip(tmp_path, suffix):
    world = make_world(SyntheticConfig(n_queries=30, seed=3))
    df = to_long_frame(world)
    path = tmp_path / f"data.{suffix}"
    df.to_parquet(path) if suffix == "parquet" else df.to_json(path, orient="records", lines=True)
    back = load_groups(path)
    assert back.query_ids == world.query_ids
    torch.testing.assert_close(back.cand_x, world.cand_x)
    torch.testing.assert_close(back.rewards, world.rewards)
    torch.testing.assert_close(back.utility, world.utility)
    assert torch.equal(back.mask, world.mask) and torch.equal(back.labels, world.labels)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda df: df.drop(columns=["reward"]), r"missing column\(s\) \['reward'\]"),
        (lambda df: df.assign(reward=[0.1, math.nan, 0.3, 0.0, 0.0]), r"row 1 .*reward is nan"),
        (lambda df: df.assign(reward=[0.1, 0.2, math.inf, 0.0, 0.0]), r"row 2 .*reward"),
        (
            lambda df: df.assign(candidate_features=[[0.0, 0.5, -1.0]] * 3 + [[1.0, math.nan, 0.0], [0.0, 0.0, 0.0]]),
            r"row 3 .*candidate_features contains NaN",
        ),
        (
            lambda df: df.assign(query_features=[[1.0, 2.0]] * 3 + [[3.0, 4.0, 5.0], [3.0, 4.0]]),
            r"row 3 .*query_features has length 3 but most rows have 2",
        ),
        (lambda df: df.assign(is_label=[False, False, False, True, False]), r"query_id='q1' has no candidate"),
        (lambda df: df.assign(is_label=[True, False, True, True, False]), r"query_id='q1' has 2 candidates"),
        (lambda df: df.iloc[:4], r"query_id='q2' has 1 candidate row"),
    ],
    ids=[
        "missing-column",
        "nan-reward",
        "inf-reward",
        "nan-feature",
        "feature-dim",
        "no-label",
        "two-labels",
        "group-of-one",
    ],
)
def test_bad_long_frames_name_the_problem(mutate, needle):
    with pytest.raises(DataValidationError, match=needle):
        from_long_frame(mutate(long_frame()))


def test_label_on_masked_candidate_is_rejected():
    d = from_long_frame(long_frame())
    with pytest.raises(DataValidationError, match=r"labels\[1\] .*points at masked candidate 2"):
        GroupData(
            query_x=d.query_x,
            cand_x=d.cand_x,
            mask=d.mask,
            labels=torch.tensor([2, 2]),
            rewards=d.rewards,
            query_ids=d.query_ids,
        )


def test_in_memory_validation_names_fields():
    d = from_long_frame(long_frame())
    bad_rewards = d.rewards.clone()
    bad_rewards[0, 1] = float("nan")
    with pytest.raises(DataValidationError, match=r"rewards has a NaN/inf value at index \[0, 1\]"):
        GroupData(d.query_x, d.cand_x, d.mask, d.labels, bad_rewards, d.query_ids)
    # NaN under the mask (padding) is not an error: padding never counts.
    padded = d.rewards.clone()
    padded[1, 2] = float("nan")
    GroupData(d.query_x, d.cand_x, d.mask, d.labels, padded, d.query_ids)
    one = d.mask.clone()
    one[1, 1] = False
    with pytest.raises(DataValidationError, match=r"group 1 .*has 1 candidate"):
        GroupData(d.query_x, d.cand_x, one, d.labels, d.rewards, d.query_ids)
    with pytest.raises(DataValidationError, match=r"mask must be \[N, G\]"):
        GroupData(d.query_x, d.cand_x, d.mask[:, :2], d.labels, d.rewards, d.query_ids)


def test_unsupported_file_type(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataValidationError, match=r"unsupported extension '.csv'; use .parquet or .jsonl"):
        load_groups(p)


def test_split_by_query_is_disjoint_and_seeded():
    world = make_world(SyntheticConfig(n_queries=100))
    a = split_by_query(world, val_frac=0.2, test_frac=0.1, seed=1)
    b = split_by_query(world, val_frac=0.2, test_frac=0.1, seed=1)
    c = split_by_query(world, val_frac=0.2, test_frac=0.1, seed=2)
    ids = [set(s.query_ids) for s in (a.train, a.val, a.test)]
    assert [len(s) for s in ids] == [70, 20, 10]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert a.val.query_ids == b.val.query_ids and a.val.query_ids != c.val.query_ids
    with pytest.raises(ValueError, match="val_frac"):
        split_by_query(world, val_frac=0.6, test_frac=0.5)


def test_synthetic_world_is_seeded_and_knobs_work():
    a, b = make_world(SyntheticConfig(n_queries=50, seed=1)), make_world(SyntheticConfig(n_queries=50, seed=1))
    assert torch.equal(a.cand_x, b.cand_x) and torch.equal(a.rewards, b.rewards)
    sizes = a.mask.sum(1)
    assert sizes.min() >= 4 and sizes.max() <= 8
    # With no bias and no noise the reward *is* the utility; with bias they disagree.
    clean = make_world(SyntheticConfig(n_queries=50, reward_bias=0.0, reward_noise=0.0))
    torch.testing.assert_close(clean.rewards, clean.utility)
    biased = make_world(SyntheticConfig(n_queries=50, reward_bias=2.0, reward_noise=0.0))
    assert (biased.rewards - biased.utility)[biased.mask].abs().mean() > 1.0
    # With no label noise the label is the best candidate by true utility.
    exact = make_world(SyntheticConfig(n_queries=50, label_noise=0.0))
    best = exact.utility.masked_fill(~exact.mask, -np.inf).argmax(1)
    assert torch.equal(exact.labels, best)
    with pytest.raises(ValueError, match="min_group_size"):
        SyntheticConfig(min_group_size=1)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            lambda df: df.assign(is_label=["false", "false", "true", "true", "false"]),
            r"row 0 .*is_label is 'false'; it must be true/false",
        ),
        (lambda df: df.assign(is_label=[None, False, True, True, False]), r"row 0 .*is_label is None"),
        (lambda df: df.assign(query_features=[[]] * 5), r"row 0 .*query_features is empty"),
        (
            lambda df: df.assign(candidate_features=[["a", "b", "c"]] + [[0.0, 0.5, -1.0]] * 4),
            r"row 0 .*candidate_features must hold numbers",
        ),
    ],
    ids=["string-labels", "null-label", "empty-features", "string-features"],
)
def test_more_bad_long_frames(mutate, needle):
    with pytest.raises(DataValidationError, match=needle):
        from_long_frame(mutate(long_frame()))


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_unreadable_files_name_the_format(tmp_path, suffix):
    good = tmp_path / f"good.{suffix}"
    df = long_frame()
    df.to_parquet(good) if suffix == "parquet" else df.to_json(good, orient="records", lines=True)
    broken = tmp_path / f"broken.{suffix}"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(DataValidationError, match=r"could not be read as (Parquet|JSON lines)"):
        load_groups(broken)


def test_iterate_batches_over_a_share_of_the_rows_is_that_slice_in_order():
    """A torchrun rank's share: the groups of ``rows`` in order, in batches, and every rank's shares together are
    the whole dataset once."""
    from v3kit.data import iterate_batches
    from v3kit.train.distributed import Dist

    data = make_world(SyntheticConfig(n_queries=23, seed=1))
    got = torch.cat([b.index for b in iterate_batches(data, 4, rows=slice(5, 16))])
    assert got.tolist() == list(range(5, 16))
    shares = [Dist(r, 3).rows(len(data)) for r in range(3)]
    seen = [i for s in shares for b in iterate_batches(data, 5, rows=s) for i in b.index.tolist()]
    assert seen == list(range(len(data)))
    with pytest.raises(ValueError, match="shuffle"):
        next(iterate_batches(data, 4, shuffle=True, rows=slice(0, 3)))


def test_groupdata_check_levels():
    """``checks="none"`` (the packed cache) builds without validating; the default validates; an unknown level is
    refused."""
    d = make_world(SyntheticConfig(n_queries=12, seed=0))
    bad = d.rewards.clone()
    bad[0, 0] = float("nan")
    fields = dict(query_x=d.query_x, cand_x=d.cand_x, mask=d.mask, labels=d.labels, rewards=bad, query_ids=d.query_ids)
    with pytest.raises(DataValidationError, match="rewards"):
        GroupData(**fields)
    with pytest.raises(DataValidationError, match="rewards"):
        GroupData(**fields, checks="no_feature_scan")  # only the feature scan is skipped
    assert GroupData(**fields, checks="none").rewards is bad
    with pytest.raises(ValueError, match="checks"):
        GroupData(**fields, checks="some")
