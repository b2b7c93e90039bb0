"""Arrow IPC / Feather v2 input: the same GroupData and the same error messages as Parquet and the in-memory frame;
the min/max fast checks still name the exact row; the concurrent feature passes report errors in the old order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_ingest import assert_same, ragged_frame, slow_pack

from v3kit.config import ConfigError, load_config
from v3kit.data import ingest
from v3kit.data.cache import load_cached
from v3kit.data.contract import MAX_FEATURE_ABS, DataValidationError, _nonfinite
from v3kit.data.long_frame import from_long_frame
from v3kit.data.tables import load_groups

LAYOUTS = {  # how a feature column of dimension d is stored
    "list-float64": lambda d: pa.list_(pa.float64()),
    "list-float32": lambda d: pa.list_(pa.float32()),
    "fixed-size-float32": lambda d: pa.list_(pa.float32(), d),
    "large-list-float64": lambda d: pa.large_list(pa.float64()),
}


def f32_frame(seed: int, **kw) -> pd.DataFrame:
    """:func:`ragged_frame` with float32-representable features, so float32 and float64 files hold the same
    numbers and every path must give bit-identical tensors."""
    df = ragged_frame(seed, **kw)
    for col in ("query_features", "candidate_features"):
        df[col] = [np.float32(v).astype(np.float64).tolist() for v in df[col]]
    return df


def to_table(df: pd.DataFrame, layout: str = "list-float64") -> pa.Table:
    table = pa.Table.from_pandas(df, preserve_index=False)
    for name in ("query_features", "candidate_features"):
        col = df[name]
        dim = len(col.iloc[0]) if len(col) and isinstance(col.iloc[0], list) else 1
        i = table.schema.get_field_index(name)
        if layout != "list-float64" and pa.types.is_list(table.schema.field(name).type):
            table = table.set_column(i, name, table.column(name).cast(LAYOUTS[layout](dim)))
    return table


def write_arrow(table: pa.Table, path, *, stream: bool = False, batch: int = 11, compression=None):
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema, options=opts) as w:
        w.write_table(table, max_chunksize=batch)  # small record batches: groups straddle batch borders
    return path


def same_data(a, b) -> None:
    assert a.query_ids == b.query_ids
    for name in ("query_x", "cand_x", "mask", "labels", "rewards", "utility"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_arrow_matches_parquet_and_the_frame(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 7)  # chunks straddle groups and record batches
    df = f32_frame(7)  # shuffled rows: uneven groups, queries interleaved; utility column
    table = to_table(df, layout)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=13)
    from_parquet = load_groups(tmp_path / "t.parquet")
    frame = from_long_frame(df)
    same_data(frame, from_parquet)
    assert_same(frame, slow_pack(df))  # and the obvious loop agrees
    same_data(ingest.pack_frame(df), frame)  # the vectorised packing of the frame itself
    variants = {"file": {}, "stream": {"stream": True}}
    if pa.Codec.is_available("zstd"):
        variants["zstd"] = {"compression": "zstd"}
    for name, kw in variants.items():
        for suffix in (".arrow", ".feather", ".ipc"):
            path = write_arrow(table, tmp_path / f"{name}{suffix}", **kw)
            same_data(load_groups(path), from_parquet)


def test_arrow_goes_through_the_cache_and_the_config(tmp_path, monkeypatch):
    df = f32_frame(2)
    path = write_arrow(to_table(df, "fixed-size-float32"), tmp_path / "t.feather")
    plain = load_groups(path)
    same_data(load_cached(path), plain)
    assert (tmp_path / "t.feather.v3kit-cache" / "float32" / "cand_x.npy").exists()

    def no_parse(path):
        raise AssertionError("the data file was parsed although the cache is valid")

    monkeypatch.setattr(ingest, "load_arrow", no_parse)
    same_data(load_cached(path), plain)
    monkeypatch.undo()
    # end_to_end skips the streamed path: the whole-table reader must read Arrow too (features win for training)
    same_data(load_groups(path, text_mode="end_to_end"), plain)
    df.to_feather(tmp_path / "pandas.arrow", compression="uncompressed")  # the README's recipe
    same_data(load_groups(tmp_path / "pandas.arrow"), plain)
    assert load_config(None, [f"data.path={path}"]).data.path == str(path)
    with pytest.raises(
        ConfigError,
        match=r"data.path '.*t\.csv': unsupported extension '\.csv'; use \.parquet or "
        r"\.jsonl, or Arrow IPC / Feather v2 \(\.arrow, \.feather, \.ipc\)",
    ):
        load_config(None, [f"data.path={tmp_path / 't.csv'}"])


def _set(df: pd.DataFrame, col: str, row: int, value) -> pd.DataFrame:
    df = df.copy()
    df[col] = df[col].astype(object)
    df.at[row, col] = value
    return df


def _qrows(df: pd.DataFrame, q: int) -> np.ndarray:
    return np.flatnonzero(df["query_id"].to_numpy() == f"q{q}")


BAD = {  # name: (mutation of a 40-query frame in query order, the message it must give)
    "scalar-column": (
        lambda df: df.assign(candidate_features=np.arange(len(df), dtype=float)),
        r"^row 0: candidate_features must be a list of floats, got 0\.0$",
    ),
    "null-list": (
        lambda df: _set(df, "candidate_features", 12, None),
        r"^row 12: candidate_features must be a list of floats, got None$",
    ),
    "length": (
        lambda df: _set(df, "query_features", 17, [1.0, 2.0]),
        r"^row 17 \(query_id='q\d+'\): query_features has length 2 but most rows have 3; every ",
    ),
    "empty": (
        lambda df: df.assign(query_features=[[]] * len(df)),
        r"^row 0 \(query_id='q0'\): query_features is "
        r"empty; it needs at least one feature$",
    ),
    "strings": (
        lambda df: df.assign(candidate_features=[["a"] * 5] * len(df)),
        r"^row 0 \(query_id='q0'\): candidate_features must hold numbers, got \['a', 'a', 'a', 'a'\]$",
    ),
    "nan": (
        lambda df: _set(df, "candidate_features", 23, [0.0, 1.0, np.nan, 0.0, 0.0]),
        r"^row 23 \(query_id='q\d+'\): candidate_features contains NaN/inf; clean or drop it$",
    ),
    "inf": (
        lambda df: _set(df, "candidate_features", 9, [0.0, -np.inf, 0.0, 0.0, 0.0]),
        r"^row 9 \(query_id='q\d+'\): candidate_features contains NaN/inf",
    ),
    "huge": (
        lambda df: _set(df, "candidate_features", 30, [0.0, 0.0, 0.0, -3e6, 0.0]),
        r"^row 30 \(query_id='q\d+'\): candidate_features\[3\] = -3e\+06 exceeds \|x\| <= 1e\+06; rescale",
    ),
    "query-differs": (
        lambda df: _set(df, "query_features", _qrows(df, 5)[-1], [9.0, 9.0, 9.0]),
        r"^query_id='q5': query_features differ between its rows; a query has one feature vector$",
    ),
    "no-label": (
        lambda df: df.assign(is_label=df["is_label"] & (df["query_id"] != "q3")),
        r"^query_id='q3' has no candidate with is_label=true; mark exactly one candidate",
    ),
    "two-labels": (
        lambda df: df.assign(is_label=df["is_label"] | (df["query_id"] == "q4")),
        r"^query_id='q4' has \d candidates with is_label=true; mark exactly one",
    ),
    "one-candidate": (
        lambda df: df.drop(index=_qrows(df, 6)[1:]).reset_index(drop=True),
        r"^query_id='q6' has 1 candidate row\(s\); a group needs at least 2 candidates — drop it$",
    ),
    "query-error-wins": (
        lambda df: _set(_set(df, "candidate_features", 2, [np.nan] * 5), "query_features", 31, [np.inf] * 3),
        r"^row 31 \(query_id='q\d+'\): query_features contains NaN/inf",
    ),
    "empty-table": (lambda df: df.iloc[:0], r"^the data table is empty$"),
    "missing-column": (lambda df: df.drop(columns=["is_label"]), r"^missing column\(s\) \['is_label'\]; a long-form "),
    # the scalar checks' errors come before the feature errors, as they always did
    "duplicate-wins": (
        lambda df: _set(_set(df, "candidate_id", 1, df["candidate_id"][0]), "query_features", 0, [np.nan] * 3),
        r"^query_id='q0', candidate_id='0/0' appears in rows \[0, 1\] \(rewards \[.*\]\); each ",
    ),
    "reward-wins": (
        lambda df: _set(_set(df, "reward", 35, np.inf), "candidate_features", 1, [np.nan] * 5),
        r"^row 35 \(query_id='q\d+'\): reward is inf; every reward must be a finite number$",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_the_parquet_message_on_the_arrow_path(tmp_path, monkeypatch, case):
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 8)
    mutate, needle = BAD[case]
    df = mutate(ragged_frame(3, shuffle=False))
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataValidationError) as parquet:
        load_groups(tmp_path / "bad.parquet")
    assert "\n" not in str(parquet.value)
    assert pd.Series([str(parquet.value)]).str.contains(needle).all(), str(parquet.value)
    for kw in ({}, {"stream": True}):
        with pytest.raises(DataValidationError) as arrow:
            load_groups(write_arrow(table, tmp_path / "bad.arrow", **kw))
        assert str(arrow.value) == str(parquet.value)


@pytest.mark.parametrize("damage", ["truncated", "truncated-stream", "garbage", "empty"])
def test_unreadable_arrow_files_say_so_in_one_line(tmp_path, damage):
    good = write_arrow(to_table(f32_frame(1)), tmp_path / "good.arrow", stream=damage == "truncated-stream")
    data = good.read_bytes()
    bad = tmp_path / "bad.arrow"
    bad.write_bytes({"garbage": b"not an arrow file at all " * 40, "empty": b""}.get(damage, data[: len(data) // 2]))
    with pytest.raises(DataValidationError) as e:
        load_groups(bad)
    msg = str(e.value)
    assert msg.startswith(f"data file {bad} could not be read as Arrow IPC / Feather v2 (") and "\n" not in msg
    assert msg.endswith("); check the file is complete and in that format")


def slow_first_bad(mat: np.ndarray) -> tuple[str, int] | None:
    """The obvious row loop: the first row with NaN/inf, else the first with |x| > MAX_FEATURE_ABS."""
    for kind, test in (("nan", lambda v: not np.isfinite(v)), ("huge", lambda v: abs(v) > MAX_FEATURE_ABS)):
        for i, row in enumerate(mat):
            if any(test(float(v)) for v in row):
                return kind, i
    return None


def test_min_max_fast_check_finds_the_exact_row():
    rng = np.random.default_rng(0)
    edge = np.float32(MAX_FEATURE_ABS)
    above = np.nextafter(edge, np.float32(np.inf))
    for _trial in range(60):
        mat = rng.standard_normal((int(rng.integers(1, 40)), 6)).astype(np.float32)
        for _ in range(int(rng.integers(0, 3))):  # a few bad values anywhere, or none
            r, c = rng.integers(mat.shape[0]), rng.integers(6)
            mat[r, c] = rng.choice([np.nan, np.inf, -np.inf, above, -above, edge, -edge, 5e6])
        arr = pa.FixedSizeListArray.from_arrays(pa.array(mat.ravel()), 6)
        expect = slow_first_bad(mat)
        try:
            out = ingest._chunk_matrix(arr, 100, {}, "candidate_features")
        except ingest._Problem as p:
            assert (p.kind, p.row - 100) == expect
        else:
            assert expect is None and np.array_equal(out, mat)  # +-MAX_FEATURE_ABS itself is allowed


def test_nonfinite_blocks_match_isfinite():
    rng = np.random.default_rng(1)
    t = torch.randn(23, 4, 5)
    for _ in range(5):
        t[tuple(int(rng.integers(s)) for s in t.shape)] = float(rng.choice([np.nan, np.inf, -np.inf]))
    assert torch.equal(_nonfinite(t, elements=40), ~torch.isfinite(t).all(dim=-1))  # 2 rows a block
    assert torch.equal(_nonfinite(t[:, 0], elements=40), ~torch.isfinite(t[:, 0]))
    clean = torch.randn(7, 3, 2)
    assert not _nonfinite(clean, elements=6).any() and _nonfinite(clean).shape == (7, 3)
