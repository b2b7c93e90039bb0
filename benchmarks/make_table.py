"""Write a random long-form table in chunks (bounded memory), for the ingest and epoch benchmarks.

    python benchmarks/make_table.py PATH N_QUERIES GROUP DIM [--format parquet|arrow]

The format follows the suffix unless given: ``.parquet`` (Parquet, snappy) or ``.arrow`` / ``.feather`` /
``.ipc`` (an uncompressed Arrow IPC file, i.e. Feather v2, which the kit memory-maps without copying).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMATS = ("parquet", "arrow")


def table_format(path: str | Path) -> str:
    return "arrow" if Path(path).suffix.lower() in (".arrow", ".feather", ".ipc") else "parquet"


def write_table(
    path: str | Path,
    n_queries: int,
    group: int,
    dim: int,
    *,
    seed: int = 0,
    queries_per_chunk: int = 4096,
    fmt: str | None = None,
) -> int:
    """``n_queries`` groups of ``group`` candidates with ``dim``-d float32 query and candidate features; the
    same rows whatever the format (``fmt``: ``parquet`` | ``arrow``; default from the suffix)."""
    fmt = fmt or table_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("candidate_id", pa.string()),
            ("query_features", pa.list_(pa.float32())),
            ("candidate_features", pa.list_(pa.float32())),
            ("reward", pa.float64()),
            ("is_label", pa.bool_()),
        ]
    )
    rows = 0
    writer = pq.ParquetWriter(path, schema) if fmt == "parquet" else pa.ipc.new_file(str(path), schema)
    with writer:
        for q0 in range(0, n_queries, queries_per_chunk):
            nq = min(queries_per_chunk, n_queries - q0)
            r = nq * group
            qf = np.repeat(rng.standard_normal((nq, dim), dtype=np.float32), group, axis=0)
            cf = rng.standard_normal((r, dim), dtype=np.float32)
            offsets = pa.array(np.arange(0, r * dim + 1, dim, dtype=np.int32))
            qids = np.repeat(np.arange(q0, q0 + nq), group).astype(str)
            label = np.zeros(r, dtype=bool)
            label[np.arange(nq) * group + rng.integers(0, group, nq)] = True
            batch = pa.record_batch(
                [
                    pa.array(qids),
                    pa.array(np.char.add(qids, np.tile(np.arange(group), nq).astype(str))),
                    pa.ListArray.from_arrays(offsets, pa.array(qf.ravel())),
                    pa.ListArray.from_arrays(offsets, pa.array(cf.ravel())),
                    pa.array(rng.standard_normal(r)),
                    pa.array(label),
                ],
                schema=schema,
            )
            writer.write_batch(batch)
            rows += r
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path")
    ap.add_argument("n_queries", type=int)
    ap.add_argument("group", type=int)
    ap.add_argument("dim", type=int)
    ap.add_argument("--format", choices=FORMATS, default=None, help="default: from the path's suffix")
    a = ap.parse_args()
    write_table(a.path, a.n_queries, a.group, a.dim, fmt=a.format)
