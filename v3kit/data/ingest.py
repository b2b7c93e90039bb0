"""Packing a long-form table (one row per query-candidate) into padded :class:`~v3kit.data.GroupData` arrays.

Vectorised and lean: query ids are factorised once (first-seen order), every row gets its (group, slot) position
with numpy, and the list-valued feature columns are read as Arrow list arrays chunk by chunk, validated, cast to
float32 and scattered straight into preallocated ``[N, G, D]`` arrays. No per-query Python loop and no float64 or
Python-list copy of the features, so peak memory is about the packed payload plus a few chunks. The two feature
columns are converted concurrently, one thread each (Arrow decoding and numpy's copies run without the GIL).

Inputs: Parquet files are streamed batch by batch (:func:`load_parquet`); Arrow IPC / Feather v2 files are
memory-mapped and their columns sliced without copying (:func:`load_arrow`), so the only copy of a feature is the
one into the packed array; an in-memory frame goes through the same packing (:func:`pack_frame`).

Every check of the slow reference implementation is kept, with the same messages. The fast checks look at a
chunk's min and max only (NaN propagates through both, so a finite, in-range min and max clear the whole chunk
with no temporary array); a chunk that fails is searched row by row, and a column that fails is re-examined
slowly to name the exact row.
"""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .contract import FEATURE_COLUMNS, MAX_FEATURE_ABS, DataValidationError, GroupData
from .long_frame import as_bool, as_matrix, check_group, check_long_frame

# Rows converted at a time: bounds the transient memory beside the packed arrays (Arrow's Parquet decoder holds
# a few times one batch; 4096 rows of 384-d float32 are 6 MB).
CHUNK_ROWS = 4096
ARROW_KIND = "Arrow IPC / Feather v2"


class _Problem(Exception):
    """A feature chunk failed a fast check; ``kind`` in notlist/length/empty/numbers/nan/huge, ``row`` in the table."""

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
    mat = np.asarray(flat, dtype=np.float32).reshape(n, dim)  # no copy when the values are float32 already
    # NaN fails both comparisons and inf one of them, so this clears a chunk with two reads and no temporary.
    if mat.size and not (mat.min() >= -MAX_FEATURE_ABS and mat.max() <= MAX_FEATURE_ABS):
        _find_bad_row(mat, start)
    return mat


def _find_bad_row(mat: np.ndarray, start: int) -> None:
    """The exact check of a chunk that failed the min/max test: NaN/inf rows first, then too large values."""
    bad = ~np.isfinite(mat).all(axis=1)
    if bad.any():
        raise _Problem("nan", start + int(np.flatnonzero(bad)[0]))
    huge = (np.abs(mat) > MAX_FEATURE_ABS).any(axis=1)
    if huge.any():
        raise _Problem("huge", start + int(np.flatnonzero(huge)[0]))


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
        as_matrix(self.df[field], field, self.df)  # raises the slow path's message
        raise DataValidationError(f"row {problem.row}: {field} is not a list of numbers of one length")


class _FileSource:
    """Feature chunks read from a file one column at a time (:meth:`chunks`, one reader per call, so the two
    columns can be read on two threads); :meth:`explain` re-reads a column to name the exact offending row."""

    kind = ""  # the format, for messages

    def __init__(self, path: Path, meta: pd.DataFrame) -> None:
        self.path, self.meta = path, meta

    def chunks(self, field: str) -> Iterator[tuple[int, pa.Array]]:
        raise NotImplementedError

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
            lengths = pd.Series(
                np.concatenate(
                    [
                        arr.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
                        if not pa.types.is_fixed_size_list(arr.type)
                        else np.full(len(arr), arr.type.list_size)
                        for _, arr in self.chunks(field)
                    ]
                )
            )
            common = int(lengths.mode().iloc[0])
            i = int(np.flatnonzero(lengths.to_numpy() != common)[0])
            raise DataValidationError(
                f"row {i} (query_id={self.meta['query_id'].iloc[i]!r}): {field} has length {int(lengths.iloc[i])} "
                f"but most rows have {common}; every {field} vector must have the same dimension"
            )
        if problem.kind == "empty":
            raise DataValidationError(f"{where}: {field} is empty; it needs at least one feature")
        if problem.kind == "numbers":
            raise DataValidationError(f"{where}: {field} must hold numbers, got {list(self._value(field, i))[:4]!r}")
        if problem.kind == "huge":
            row = np.asarray(self._value(field, i), dtype=np.float64)
            j = int(np.flatnonzero(np.abs(row) > MAX_FEATURE_ABS)[0])
            raise DataValidationError(
                f"{where}: {field}[{j}] = {row[j]:g} exceeds |x| <= {MAX_FEATURE_ABS:g}; "
                "rescale (e.g. standardise) the features"
            )
        raise DataValidationError(f"{where}: {field} contains NaN/inf; clean or drop it")


class _ParquetSource(_FileSource):
    """Feature chunks streamed from a Parquet file."""

    kind = "Parquet"

    def chunks(self, field: str) -> Iterator[tuple[int, pa.Array]]:
        start = 0
        try:
            # Buffered column reads instead of pre-buffering whole row groups: several times less transient memory.
            pf = pq.ParquetFile(self.path, pre_buffer=False, buffer_size=1 << 22)
            batches = pf.iter_batches(batch_size=CHUNK_ROWS, columns=[field], use_threads=False)
        except Exception as e:
            raise _unreadable(self.path, e, self.kind) from None
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a truncated or corrupt row group
                raise _unreadable(self.path, e, self.kind) from None
            yield start, batch.column(0)
            start += batch.num_rows


class _ArrowSource(_FileSource):
    """Feature chunks sliced, without copying, from a memory-mapped Arrow IPC file or stream.

    The pages of a chunk are handed back to the kernel once the chunk is packed (``MADV_DONTNEED``; they stay in
    the page cache and a later read maps them again), so the mapping does not add the file's size to the
    process's resident memory.
    """

    kind = ARROW_KIND

    def __init__(self, path: Path, meta: pd.DataFrame, ipc: "_Ipc") -> None:
        super().__init__(path, meta)
        self.ipc = ipc

    def chunks(self, field: str) -> Iterator[tuple[int, pa.Array]]:
        start = 0
        for batch in self.ipc.batches([field]):
            col = batch.column(0)
            for s in range(0, len(col), CHUNK_ROWS):
                piece = col.slice(s, CHUNK_ROWS)
                yield start + s, piece
                self.ipc.release(piece)
            start += len(col)


class _Ipc:
    """An Arrow IPC file (Feather v2) or stream, memory-mapped; :meth:`batches` reads only the named columns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.buf = pa.py_buffer(self.map)  # a zero-copy view: batches read from it are slices of the mapping
            try:
                self.schema, self.stream = pa.ipc.open_file(self.buf).schema, False
            except pa.ArrowInvalid as e:  # no file footer: an IPC stream, or a truncated file
                if self.buf[:6].to_pybytes() == b"ARROW1":
                    raise e
                self.schema, self.stream = pa.ipc.open_stream(self.buf).schema, True
        except Exception as e:  # pyarrow raises many types for truncated or foreign files
            raise _unreadable(path, e, ARROW_KIND) from None

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The record batches restricted to ``columns`` (fully validated: a corrupt offset must not crash)."""
        # Whole batches, then a selection: zero-copy (IpcReadOptions.included_fields would copy the columns).
        try:
            if self.stream:
                reader = iter(pa.ipc.open_stream(self.buf))
            else:
                file = pa.ipc.open_file(self.buf)
                reader = (file.get_batch(i) for i in range(file.num_record_batches))
        except Exception as e:
            raise _unreadable(self.path, e, ARROW_KIND) from None
        while True:
            try:
                batch = next(reader).select(columns)
                batch.validate(full=True)
            except StopIteration:
                return
            except Exception as e:  # a truncated stream or a corrupt batch
                raise _unreadable(self.path, e, ARROW_KIND) from None
            yield batch

    def release(self, arr: pa.Array) -> None:
        """Drop the mapped pages that hold ``arr``'s list values from the resident set (no-op elsewhere)."""
        if not hasattr(self.map, "madvise") or not _is_list(arr.type):
            return
        values = arr.flatten()
        try:
            width = values.type.bit_width
        except ValueError:
            return
        if width % 8 or len(values) == 0:
            return
        data = values.buffers()[-1]
        lo = data.address + values.offset * width // 8 - self.buf.address
        hi = lo + len(values) * width // 8
        page = mmap.PAGESIZE
        lo, hi = -(-lo // page) * page, hi // page * page  # whole pages inside the range only
        if 0 <= lo < hi <= len(self.buf):
            self.map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A zero float32 array whose pages are mapped up front (Linux ``MAP_POPULATE``) when it is large.

    Every page of a packed array is written once; letting each first write fault its page in costs several
    times more (and varies more) than one populating ``mmap`` call. The array owns its mapping through its base.
    """
    nbytes = int(np.prod(shape)) * 4
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if not flags or nbytes < 1 << 24:
        return np.zeros(shape, dtype=np.float32)
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    except (OSError, ValueError):  # e.g. no address space left: the ordinary allocation says so
        return np.zeros(shape, dtype=np.float32)
    return np.frombuffer(region, dtype=np.float32).reshape(shape)


def _unreadable(path: Path, e: Exception, kind: str = "Parquet") -> DataValidationError:
    return DataValidationError(
        f"data file {path} could not be read as {kind} ({type(e).__name__}: {str(e)[:200]}); "
        "check the file is complete and in that format"
    )


def arrow_schema(path: str | Path) -> pa.Schema:
    """The schema of an Arrow IPC file or stream (raises :class:`DataValidationError` when unreadable)."""
    return _Ipc(Path(path)).schema


def _feature_pass(
    source, field: str, each: Callable[[slice, np.ndarray], None], stop: threading.Event | None = None
) -> None:
    """Convert ``field`` chunk by chunk and hand each float32 matrix (with its row slice) to ``each``."""
    dims: dict[str, int] = {}
    for start, arr in source.chunks(field):
        if stop is not None and stop.is_set():
            return
        try:
            mat = _chunk_matrix(arr, start, dims, field)
        except _Problem as p:
            source.explain(field, p)
        each(slice(start, start + mat.shape[0]), mat)


def _feature_passes(source, put: dict[str, Callable[[slice, np.ndarray], None]]) -> None:
    """Both feature passes, one thread each; the first column's error wins, as when they ran one after the other
    (a failed query pass stops the candidate pass; a failed candidate pass lets the query pass finish)."""
    stops = {field: threading.Event() for field in FEATURE_COLUMNS}

    def run(field: str) -> None:
        try:
            _feature_pass(source, field, put[field], stops[field])
        except BaseException:
            if field == FEATURE_COLUMNS[0]:
                stops[FEATURE_COLUMNS[1]].set()
            raise

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="v3kit-ingest") as pool:
        futures = [pool.submit(run, field) for field in FEATURE_COLUMNS]
        try:
            errors = [f.exception() for f in futures]
        except BaseException:  # e.g. Ctrl-C while waiting: stop both passes at their next chunk
            for stop in stops.values():
                stop.set()
            raise
    for e in errors:
        if e is not None:
            raise e


def _is_label(col: pd.Series, df: pd.DataFrame) -> np.ndarray:
    if pd.api.types.is_bool_dtype(col.dtype) and not col.isna().any():
        return col.to_numpy(dtype=bool)
    if pd.api.types.is_integer_dtype(col.dtype) and col.isin((0, 1)).all():
        return col.to_numpy() == 1
    return as_bool(col, df)  # the slow check names the offending row


def pack(meta: pd.DataFrame, source) -> GroupData:
    """Pack a validated long-form table: ``meta`` holds the scalar columns (index 0..R-1), ``source`` the features."""
    codes, order = pd.factorize(meta["query_id"].astype(str))  # queries in first-seen order; ids compare as str
    codes = codes.astype(np.int64)
    n, n_rows = len(order), len(meta)
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
            box["query_x"] = _zeros((n, mat.shape[1]))
        query_x, c = box["query_x"], codes[rows]
        first = first_row[c] == np.arange(rows.start, rows.stop)
        query_x[c[first]] = mat[first]
        # A row equal to the row before it, of the same query, compares with the query's first row exactly as that
        # row did; so only the others (usually the first row of the chunk) are compared, and no [rows, D] copy of
        # the reference vectors is made.
        check = ~first
        if len(c) > 1:
            check[1:] &= ~((c[1:] == c[:-1]) & (mat[1:] == mat[:-1]).all(axis=1))
        idx = np.flatnonzero(check)
        ref, sub = query_x[c[idx]], mat[idx]
        differ = np.flatnonzero((sub != ref).any(axis=1))  # usually none: the rows repeat one vector exactly
        # np.allclose against the query's first row, as the checks always did
        same = np.isclose(sub[differ], ref[differ], rtol=1e-5, atol=1e-8).all(axis=1)
        q_differs[c[idx[differ[~same]]]] = True

    def put_cand(rows: slice, mat: np.ndarray) -> None:
        if "cand_x" not in box:
            box["cand_x"] = _zeros((n, g_max, mat.shape[1]))
        cand_x, at = box["cand_x"], codes[rows] * g_max + slot[rows]
        if (np.diff(at) == 1).all():  # consecutive slots (full groups in file order): one block copy
            cand_x.reshape(n * g_max, -1)[at[0] : at[0] + len(at)] = mat
        else:
            cand_x[codes[rows], slot[rows]] = mat

    _feature_passes(source, {"query_features": put_query, "candidate_features": put_cand})
    is_label = _is_label(meta["is_label"], meta)

    n_lab = np.bincount(codes, weights=is_label, minlength=n).astype(np.int64)
    bad = (counts < 2) | (n_lab != 1) | q_differs
    if bad.any():  # the first failing query in first-seen order, checks in the slow loop's order
        b = int(np.flatnonzero(bad)[0])
        check_group(order[b], int(counts[b]), int(n_lab[b]), bool(q_differs[b]))

    mask = np.zeros((n, g_max), dtype=bool)
    mask[codes, slot] = True
    labels = np.zeros(n, dtype=np.int64)
    lab_rows = np.flatnonzero(is_label)
    labels[codes[lab_rows]] = slot[lab_rows]

    def grid(col: str) -> np.ndarray:
        out = np.zeros((n, g_max), dtype=np.float32)
        out[codes, slot] = meta[col].to_numpy(dtype=np.float64)  # float64 -> float32 rounds once, as before
        return out

    out = dict(
        query_x=torch.from_numpy(box["query_x"]),
        cand_x=torch.from_numpy(box["cand_x"]),
        mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
        rewards=torch.from_numpy(grid("reward")),
        query_ids=[str(x) for x in order],
        utility=torch.from_numpy(grid("utility")) if "utility" in meta.columns else None,
        cand_ids=torch.from_numpy(_cand_codes(meta, codes, slot, n, g_max)),
    )
    return GroupData(**out, checks="no_feature_scan")  # every feature value was checked chunk by chunk above


def _cand_codes(meta: pd.DataFrame, codes: np.ndarray, slot: np.ndarray, n: int, g_max: int) -> np.ndarray:
    """[N, G] codes of ``candidate_id`` (equal ids, equal codes; -1 at padding), as :func:`from_long_frame` makes."""
    out = np.full((n, g_max), -1, dtype=np.int64)
    out[codes, slot] = pd.factorize(meta["candidate_id"].astype(str))[0]
    return out


def pack_frame(df: pd.DataFrame) -> GroupData:
    """:func:`pack` for an in-memory frame (already checked by :func:`~v3kit.data.check_long_frame`)."""
    return pack(df, _FrameSource(df))


def load_parquet(path: Path) -> GroupData:
    """Stream a long-form Parquet file into :class:`GroupData` without materialising its feature lists."""
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        scalar = [c for c in names if c not in FEATURE_COLUMNS]
        meta = pf.read(columns=scalar, use_pandas_metadata=True).to_pandas().reset_index(drop=True)
        n_rows = pf.metadata.num_rows
    except Exception as e:  # pyarrow raises many types for truncated or foreign files
        raise _unreadable(path, e) from None
    try:
        return _pack_file(meta, names, n_rows, _ParquetSource(path, meta))
    finally:
        pa.default_memory_pool().release_unused()  # the decoder's freed buffers, kept by the pool otherwise


def load_arrow(path: Path) -> GroupData:
    """A long-form Arrow IPC file (Feather v2) or stream into :class:`GroupData`: memory-mapped, each feature
    column sliced chunk by chunk without a copy, validated and packed like :func:`load_parquet` (same checks, same
    messages). List, large-list and fixed-size-list feature columns of any numeric type; uncompressed files are
    read zero-copy, compressed ones are decompressed one record batch at a time."""
    ipc = _Ipc(Path(path))
    names = ipc.schema.names
    scalar = [c for c in names if c not in FEATURE_COLUMNS]
    try:
        table = pa.Table.from_batches(
            list(ipc.batches(scalar)),
            schema=pa.schema([ipc.schema.field(c) for c in scalar], metadata=ipc.schema.metadata),
        )
        meta = table.to_pandas().reset_index(drop=True)
    except DataValidationError:
        raise
    except Exception as e:
        raise _unreadable(path, e, ARROW_KIND) from None
    try:
        return _pack_file(meta, names, table.num_rows, _ArrowSource(Path(path), meta, ipc))
    finally:
        pa.default_memory_pool().release_unused()  # freed Arrow buffers (the meta columns' conversion)


def _pack_file(meta: pd.DataFrame, names: list[str], n_rows: int, source: _FileSource) -> GroupData:
    """The table-level checks on the scalar columns, then :func:`pack`."""
    present = set(meta.columns) | (set(FEATURE_COLUMNS) & set(names))
    columns = [c for c in names if c in present]
    check_long_frame(meta, columns, n_rows)
    return pack(meta, source)
