"""Reading long-form data files: Parquet, Arrow IPC / Feather v2 and JSON lines, into :class:`~v3kit.data.GroupData`.

:func:`load_groups` is the entry point: feature tables are streamed into packed arrays by :mod:`v3kit.data.ingest`,
everything else (text columns, JSONL) is read whole (:func:`read_table`) and packed by
:func:`v3kit.data.from_long_frame`. The memory-mapped cache of a feature table (:mod:`v3kit.data.cache`,
:func:`~v3kit.data.cache.load_cached`) builds on this module: it reads the file through :func:`load_groups`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import ingest
from .contract import FEATURE_COLUMNS, DataValidationError, Embedder, GroupData, check_feature_dtype, to_feature_dtype
from .long_frame import from_long_frame

# Suffixes of the long-form table formats (lower case); data.path is checked against them.
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")  # Arrow IPC file (= Feather v2) or stream format
TABLE_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES + ARROW_SUFFIXES
SUFFIX_HINT = "use .parquet or .jsonl, or Arrow IPC / Feather v2 (.arrow, .feather, .ipc)"


def read_arrow_ipc(source: Any) -> Any:
    """An Arrow IPC file (Feather v2) or, failing that, an Arrow IPC stream, from a seekable pyarrow file
    (zero-copy from a memory map)."""
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:  # no file footer: the stream format, unless the file format's magic says truncated
        source.seek(0)
        if source.read(6) == b"ARROW1":
            raise
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a long-form Parquet (``.parquet``), JSON-lines (``.jsonl``/``.json``) or Arrow IPC / Feather v2
    (``.arrow``/``.feather``/``.ipc``) file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        reader, kind = pd.read_parquet, "Parquet"
    elif suffix in JSONL_SUFFIXES:
        reader, kind = (lambda p: pd.read_json(p, lines=True)), "JSON lines (one object per line)"
    elif suffix in ARROW_SUFFIXES:

        def reader(p: Path) -> pd.DataFrame:
            return read_arrow_ipc(pa.memory_map(str(p))).to_pandas()

        kind = "Arrow IPC / Feather v2"
    else:
        raise DataValidationError(f"data file {path}: unsupported extension {suffix!r}; {SUFFIX_HINT}")
    try:
        return reader(path)
    except Exception as e:  # pyarrow / pandas raise many types for truncated or foreign files
        raise DataValidationError(
            f"data file {path} could not be read as {kind} ({type(e).__name__}: "
            f"{str(e)[:200]}); check the file is complete and in that format"
        ) from None


def load_groups(
    path: str | Path,
    *,
    embed: Embedder | None = None,
    text_mode: str = "frozen",
    feature_dtype: str = "float32",
) -> GroupData:
    """Load and validate a long-form Parquet, Arrow IPC / Feather v2 or JSONL file into :class:`GroupData`.

    A Parquet or Arrow IPC file with both feature columns is streamed column by column into float32 arrays
    (:mod:`v3kit.data.ingest`; an Arrow IPC file is memory-mapped and read without copies, the fastest input);
    text-only sides and JSONL go through :func:`from_long_frame` (``embed``, ``text_mode``). The packed,
    memory-mapped cache next to a feature table, with which a second load reads almost nothing, is
    :func:`v3kit.data.cache.load_cached`. ``feature_dtype``: ``"float16"`` stores the features at half the memory (batches are
    cast back to float32).
    """
    check_feature_dtype(feature_dtype)
    path = Path(path)
    kind = _feature_table(path) if text_mode != "end_to_end" else None
    if kind == "parquet":
        data = ingest.load_parquet(path)
    elif kind == "arrow":
        data = ingest.load_arrow(path)
    else:
        data = from_long_frame(read_table(path), embed=embed, text_mode=text_mode)
    if feature_dtype == "float16":
        data.query_x = torch.from_numpy(to_feature_dtype(data.query_x, feature_dtype, "query_x", path))
        data.cand_x = torch.from_numpy(to_feature_dtype(data.cand_x, feature_dtype, "cand_x", path))
    return data


def _feature_table(path: Path) -> str | None:
    """``"parquet"`` / ``"arrow"`` for a file of that format whose schema has both feature columns (the streamed
    path needs no text encoder), else None."""
    suffix = path.suffix.lower()
    if suffix not in PARQUET_SUFFIXES + ARROW_SUFFIXES or not path.is_file():
        return None
    try:
        if suffix in PARQUET_SUFFIXES:
            names, kind = pq.read_schema(path).names, "parquet"
        else:
            names, kind = ingest.arrow_schema(path).names, "arrow"
    except Exception:  # unreadable: the general path names the file and the problem
        return None
    return kind if all(c in names for c in FEATURE_COLUMNS) else None
