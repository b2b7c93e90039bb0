"""Packing a long-form table (one row per query-candidate) into padded :class:`~v3kit.data.GroupData` arrays.

Vectorised and lean: query ids are factorised once (first-seen order), every row gets its (group, slot) position
with numpy, and the list-valued feature columns are read as Arrow list arrays chunk by chunk, validated, cast to
float32 and scattered straight into preallocated ``[N, G, D]`` arrays. No per-query Python loop and no float64 or
Python-list copy of the features, so peak memory is about the packed payload plus one chunk. Parquet files are
streamed row group by row group (:func:`load_parquet`); an in-memory frame goes through the same packing.

Every check of the slow reference implementation is kept, with the same messages: a column that fails the fast
checks is re-examined slowly to name the exact row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .data import (FEATURE_COLUMNS, MAX_FEATURE_ABS, DataValidationError, GroupData, _as_bool, _as_matrix,
                   check_long_frame)

CHUNK_ROWS = 16384  # rows converted at a time: bounds the transient memory beside the packed arrays


class _Problem(Exception):
    """A feature chunk failed a fast check; ``kind`` in notlist/length/empty/numbers/nan, ``row`` in the table."""

    def __init__(self, kind: str, row: int) -> None:
        super().__init__(kind, row)
        self.kind, self.row = kind, row


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _chunk_matrix(arr: pa.Array, start: int, dims: dict[str, int], field: str) -> np.ndarray:
    """One chunk of a list column as a float32 ``[rows, D]`` matrix; raise :class:`_Problem` on bad input."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if not _is_list(arr.type):
        raise _Problem("notlist", start)
    if arr.null_count:
        raise _Problem("notlist", start + int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]))
    if pa.types.is_fixed_size_list(arr.type):
        lengths = np.full(n, arr.type.list_size, dtype=np.int64)
    else:
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    dim = dims.setdefault(field, int(lengths[0]) if n else 0)
    if (lengths != dim).any():
        raise _Problem("length", start + int(np.flatnonzero(lengths != dim)[0]))
    if dim == 0:
        raise _Problem("empty", start)
    values = arr.flatten()  # honours slicing; a fixed-size list's values likewise
    vt = values.type
    if not (pa.types.is_floating(vt) or pa.types.is_integer(vt) or pa.types.is_boolean(vt)):
        raise _Problem("numbers", start)
    flat = values.to_numpy(zero_copy_only=False)  # nulls inside a list come back as NaN
    mat = np.asarray(flat, dtype=np.float32).reshape(n, dim)
    bad = ~np.isfinite(mat).all(axis=1)
    if bad.any():
        raise _Problem("nan", start + int(np.flatnonzero(bad)[0]))
    huge = (np.abs(mat) > MAX_FEATURE_ABS).any(axis=1)
    if huge.any():
        raise _Problem("huge", start + int(np.flatnonzero(huge)[0]))
    return mat


class _FrameSource:
    """Feature chunks of an in-memory frame; a failed fast check re-runs the slow check for the exact message."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df

    def chunks(self, field: str) -> Iterator[tuple[int, pa.Array]]:
        col = self.df[field]
        for s in range(0, len(col), CHUNK_ROWS):
            try:
                yield s, pa.array(col.iloc[s : s + CHUNK_ROWS], from_pandas=True)
            except (pa.ArrowException, TypeError, ValueError):
                self.explain(field, _Problem("numbers", s))

    def explain(self, field: str, problem: _Problem) -> None:
        _as_matrix(self.df[field], field, self.df)  # raises the slow path's message
        raise DataValidationError(f"row {problem.row}: {field} is not a list of numbers of one length")


class _ParquetSource:
    """Feature chunks streamed from a Parquet file, one column at a time."""

    def __init__(self, path: Path, pf: pq.ParquetFile, meta: pd.DataFrame) -> None:
        self.path, self.pf, self.meta = path, pf, meta

    def chunks(self, field: str) -> Iterator[tuple[int, pa.Array]]:
        start = 0
        batches = self.pf.iter_batches(batch_size=CHUNK_ROWS, columns=[field])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a truncated or corrupt row group
                raise _unreadable(self.path, e) from None
            yield start, batch.column(0)
            start += batch.num_rows

    def _value(self, field: str, row: int) -> object:
        for s, arr in self.chunks(field):
            if s <= row < s + len(arr):
                return arr[row - s].as_py()
        return None

    def explain(self, field: str, problem: _Problem) -> None:
        i, qid = problem.row, self.meta["query_id"].iloc[problem.row]
        where = f"row {i} (query_id={qid!r})"
        if problem.kind == "notlist":
            raise DataValidationError(f"row {i}: {field} must be a list of floats, got {self._value(field, i)!r}")
        if problem.kind == "length":
            lengths = pd.Series(np.concatenate([
                arr.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
                if not pa.types.is_fixed_size_list(arr.type) else np.full(len(arr), arr.type.list_size)
                for _, arr in self.chunks(field)]))
            common = int(lengths.mode().iloc[0])
            i = int(np.flatnonzero(lengths.to_numpy() != common)[0])
            raise DataValidationError(
                f"row {i} (query_id={self.meta['query_id'].iloc[i]!r}): {field} has length {int(lengths.iloc[i])} "
                f"but most rows have {common}; every {field} vector must have the same dimension")
        if problem.kind == "empty":
            raise DataValidationError(f"{where}: {field} is empty; it needs at least one feature")
        if problem.kind == "numbers":
            raise DataValidationError(f"{where}: {field} must hold numbers, got {list(self._value(field, i))[:4]!r}")
        if problem.kind == "huge":
            row = np.asarray(self._value(field, i), dtype=np.float64)
            j = int(np.flatnonzero(np.abs(row) > MAX_FEATURE_ABS)[0])
            raise DataValidationError(f"{where}: {field}[{j}] = {row[j]:g} exceeds |x| <= {MAX_FEATURE_ABS:g}; "
                                      "rescale (e.g. standardise) the features")
        raise DataValidationError(f"{where}: {field} contains NaN/inf; clean or drop it")


def _unreadable(path: Path, e: Exception) -> DataValidationError:
    return DataValidationError(f"data file {path} could not be read as Parquet ({type(e).__name__}: {str(e)[:200]}); "
                               "check the file is complete and in that format")


def _feature_pass(source, field: str, each: Callable[[slice, np.ndarray], None]) -> None:
    """Convert ``field`` chunk by chunk and hand each float32 matrix (with its row slice) to ``each``."""
    dims: dict[str, int] = {}
    for start, arr in source.chunks(field):
        try:
            mat = _chunk_matrix(arr, start, dims, field)
        except _Problem as p:
            source.explain(field, p)
        each(slice(start, start + mat.shape[0]), mat)


def _is_label(col: pd.Series, df: pd.DataFrame) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col.dtype) and not col.isna().any():
        return col.to_numpy(dtype=bool)
    if pd.api.types.is_integer_dtype(col.dtype) and col.isin((0, 1)).all():
        return col.to_numpy() == 1
    return _as_bool(col, df)  # the slow check names the offending row


def pack(meta: pd.DataFrame, source) -> GroupData:
    """Pack a validated long-form table: ``meta`` holds the scalar columns (index 0..R-1), ``source`` the features."""
    qids = meta["query_id"].astype(str).to_numpy()
    codes, order = pd.factorize(qids)  # queries in first-seen order
    codes = codes.astype(np.int64)
    n, n_rows = len(order), len(qids)
    counts = np.bincount(codes, minlength=n)
    # Slot of a row = how many rows of its query come before it (a stable sort keeps file order within a query).
    by_query = np.argsort(codes, kind="stable")
    starts = np.cumsum(counts) - counts
    slot = np.empty(n_rows, dtype=np.int64)
    slot[by_query] = np.arange(n_rows) - np.repeat(starts, counts)
    first_row = by_query[starts]
    g_max = int(counts.max())

    box: dict[str, np.ndarray] = {}
    q_differs = np.zeros(n, dtype=bool)

    def put_query(rows: slice, mat: np.ndarray) -> None:
        if "query_x" not in box:
            box["query_x"] = np.zeros((n, mat.shape[1]), dtype=np.float32)
        query_x, c = box["query_x"], codes[rows]
        first = first_row[c] == np.arange(rows.start, rows.stop)
        query_x[c[first]] = mat[first]
        ref = query_x[c]
        differ = np.flatnonzero((mat != ref).any(axis=1))  # usually none: the rows repeat one vector exactly
        # np.allclose against the query's first row, as the checks always did
        same = np.isclose(mat[differ], ref[differ], rtol=1e-5, atol=1e-8).all(axis=1)
        q_differs[c[differ[~same]]] = True

    def put_cand(rows: slice, mat: np.ndarray) -> None:
        if "cand_x" not in box:
            box["cand_x"] = np.zeros((n, g_max, mat.shape[1]), dtype=np.float32)
        box["cand_x"][codes[rows], slot[rows]] = mat

    _feature_pass(source, "query_features", put_query)
    _feature_pass(source, "candidate_features", put_cand)
    is_label = _is_label(meta["is_label"], meta)

    n_lab = np.bincount(codes, weights=is_label, minlength=n).astype(np.int64)
    bad = (counts < 2) | (n_lab != 1) | q_differs
    if bad.any():  # the first failing query in first-seen order, checks in the slow loop's order
        b = int(np.flatnonzero(bad)[0])
        qid = order[b]
        if counts[b] < 2:
            raise DataValidationError(f"query_id={qid!r} has {counts[b]} candidate row(s); a group needs at least 2 "
                                      "candidates — drop it")
        if n_lab[b] != 1:
            what = "no candidate" if n_lab[b] == 0 else f"{n_lab[b]} candidates"
            raise DataValidationError(f"query_id={qid!r} has {what} with is_label=true; mark exactly one candidate "
                                      "per query as the label")
        raise DataValidationError(f"query_id={qid!r}: query_features differ between its rows; a query has one "
                                  "feature vector")

    mask = np.zeros((n, g_max), dtype=bool)
    mask[codes, slot] = True
    labels = np.zeros(n, dtype=np.int64)
    lab_rows = np.flatnonzero(is_label)
    labels[codes[lab_rows]] = slot[lab_rows]

    def grid(col: str) -> np.ndarray:
        out = np.zeros((n, g_max), dtype=np.float32)
        out[codes, slot] = meta[col].to_numpy(dtype=np.float64)  # float64 -> float32 rounds once, as before
        return out

    return GroupData(
        query_x=torch.from_numpy(box["query_x"]),
        cand_x=torch.from_numpy(box["cand_x"]),
        mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
        rewards=torch.from_numpy(grid("reward")),
        query_ids=[str(x) for x in order],
        utility=torch.from_numpy(grid("utility")) if "utility" in meta.columns else None,
    )


def pack_frame(df: pd.DataFrame) -> GroupData:
    """:func:`pack` for an in-memory frame (already checked by :func:`~v3kit.data.check_long_frame`)."""
    return pack(df, _FrameSource(df))


def load_parquet(path: Path) -> GroupData:
    """Stream a long-form Parquet file into :class:`GroupData` without materialising its feature lists."""
    try:
        # Buffered column reads instead of pre-buffering whole row groups: several times less transient memory.
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 22)
        names = pf.schema_arrow.names
        scalar = [c for c in names if c not in FEATURE_COLUMNS]
        meta = pf.read(columns=scalar, use_pandas_metadata=True).to_pandas().reset_index(drop=True)
    except Exception as e:  # pyarrow raises many types for truncated or foreign files
        raise _unreadable(path, e) from None
    present = set(meta.columns) | (set(FEATURE_COLUMNS) & set(names))
    columns = [c for c in names if c in present]
    check_long_frame(meta, columns, pf.metadata.num_rows)
    return pack(meta, _ParquetSource(path, pf, meta))
