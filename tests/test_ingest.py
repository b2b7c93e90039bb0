"""Vectorised ingest (v3kit.data.ingest) against a slow obvious loop, for frames and streamed Parquet files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from v3kit.data import DataValidationError, from_long_frame, ingest
from v3kit.data.tables import load_groups


def ragged_frame(
    seed: int, n_queries: int = 40, dq: int = 3, dc: int = 5, shuffle: bool = True, mixed_ids: bool = False
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        k = int(rng.integers(2, 7))
        qf = rng.normal(size=dq).tolist()
        label = int(rng.integers(k))
        for c in range(k):
            qid = q * 7 if mixed_ids and q % 3 == 0 else f"q{q}"
            rows.append(
                {
                    "query_id": qid,
                    "candidate_id": f"{q}/{c}",
                    "query_features": qf,
                    "candidate_features": rng.normal(size=dc).tolist(),
                    "reward": float(rng.normal()),
                    "is_label": c == label,
                    "utility": float(rng.normal()),
                }
            )
    df = pd.DataFrame(rows)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True) if shuffle else df


def slow_pack(df: pd.DataFrame) -> dict:
    """The obvious loop: queries in first-seen order, candidates in row order, float64 then float32."""
    order: list[str] = []
    rows: dict[str, list[int]] = {}
    for i, qid in enumerate(df["query_id"].astype(str)):
        if qid not in rows:
            order.append(qid)
            rows[qid] = []
        rows[qid].append(i)
    g = max(len(r) for r in rows.values())
    n, dq, dc = len(order), len(df["query_features"][0]), len(df["candidate_features"][0])
    out = {
        "query_x": np.zeros((n, dq)),
        "cand_x": np.zeros((n, g, dc)),
        "mask": np.zeros((n, g), bool),
        "labels": np.zeros(n, np.int64),
        "rewards": np.zeros((n, g)),
        "utility": np.zeros((n, g)),
    }
    for b, qid in enumerate(order):
        out["query_x"][b] = df["query_features"][rows[qid][0]]
        for k, i in enumerate(rows[qid]):
            out["cand_x"][b, k] = df["candidate_features"][i]
            out["mask"][b, k] = True
            out["rewards"][b, k] = df["reward"][i]
            out["utility"][b, k] = df["utility"][i]
            if df["is_label"][i]:
                out["labels"][b] = k
    out["query_ids"] = order
    return out


def assert_same(d, ref: dict) -> None:
    assert d.query_ids == ref["query_ids"]
    for name in ("query_x", "cand_x", "rewards", "utility"):
        t = getattr(d, name)
        assert t.dtype == torch.float32
        assert torch.equal(t, torch.tensor(ref[name], dtype=torch.float32)), name
    assert torch.equal(d.mask, torch.tensor(ref["mask"])) and torch.equal(d.labels, torch.tensor(ref["labels"]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_packing_matches_slow_loop(seed, monkeypatch):
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 7)  # many chunks, groups straddling chunk borders
    df = ragged_frame(seed, shuffle=seed > 0, mixed_ids=True)  # ids compare as str(id)
    assert_same(from_long_frame(df), slow_pack(df))


@pytest.mark.parametrize("layout", ["list-float64", "list-float32", "fixed-size", "large-list"])
def test_streamed_parquet_matches_slow_loop(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 9)
    df = ragged_frame(5)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if layout != "list-float64":
        typ = {
            "list-float32": lambda d: pa.list_(pa.float32()),
            "fixed-size": lambda d: pa.list_(pa.float32(), d),
            "large-list": lambda d: pa.large_list(pa.float64()),
        }[layout]
        for name, dim in (("query_features", 3), ("candidate_features", 5)):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, table.column(name).cast(typ(dim)))
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=11)
    ref = slow_pack(df)
    if layout == "list-float32" or layout == "fixed-size":  # the file holds float32: compare against that
        ref["query_x"] = ref["query_x"].astype(np.float32)
        ref["cand_x"] = ref["cand_x"].astype(np.float32)
    assert_same(load_groups(path), ref)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            lambda df: df.assign(
                candidate_features=[[0.0, 1.0, 2.0, 3.0, 4.0]] * 3
                + [[1.0, np.nan, 0, 0, 0]]
                + [[0.0] * 5] * (len(df) - 4)
            ),
            r"row 3 .*candidate_features contains NaN",
        ),
        (
            lambda df: df.assign(
                query_features=[[1.0, 2.0, 3.0]] * 20 + [[1.0, 2.0]] + [[1.0, 2.0, 3.0]] * (len(df) - 21)
            ),
            r"row 20 .*query_features has length 2 but most rows have 3",
        ),
        (
            lambda df: df.assign(candidate_features=[None] + list(df["candidate_features"][1:])),
            r"row 0: candidate_features must be a list of floats, got None",
        ),
        (
            lambda df: df.assign(candidate_features=[["a"] * 5] * len(df)),
            r"row 0 .*candidate_features must hold numbers",
        ),
    ],
    ids=["nan", "length", "null-list", "strings"],
)
def test_streamed_parquet_errors_name_the_row(tmp_path, monkeypatch, mutate, needle):
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 8)
    df = mutate(ragged_frame(3, shuffle=False))
    path = tmp_path / "bad.parquet"
    df.to_parquet(path)
    with pytest.raises(DataValidationError, match=needle):
        load_groups(path)
    with pytest.raises(DataValidationError, match=needle):  # the in-memory path says the same
        from_long_frame(df)


def test_query_features_must_agree_within_a_query():
    df = ragged_frame(4, shuffle=False)
    qid = df["query_id"][0]
    rows = df.index[df["query_id"] == qid]
    df.at[rows[-1], "query_features"] = [9.0, 9.0, 9.0]
    with pytest.raises(DataValidationError, match=rf"query_id='{qid}': query_features differ"):
        from_long_frame(df)
