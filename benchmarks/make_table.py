"""Write a random long-form Parquet table in chunks (bounded memory), for the ingest and epoch benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_table(path: str | Path, n_queries: int, group: int, dim: int, *, seed: int = 0,
                queries_per_chunk: int = 4096) -> int:
    """``n_queries`` groups of ``group`` candidates with ``dim``-d float32 query and candidate features."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([("query_id", pa.string()), ("candidate_id", pa.string()),
                        ("query_features", pa.list_(pa.float32())), ("candidate_features", pa.list_(pa.float32())),
                        ("reward", pa.float64()), ("is_label", pa.bool_())])
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for q0 in range(0, n_queries, queries_per_chunk):
            nq = min(queries_per_chunk, n_queries - q0)
            r = nq * group
            qf = np.repeat(rng.standard_normal((nq, dim), dtype=np.float32), group, axis=0)
            cf = rng.standard_normal((r, dim), dtype=np.float32)
            offsets = pa.array(np.arange(0, r * dim + 1, dim, dtype=np.int32))
            qids = np.repeat(np.arange(q0, q0 + nq), group).astype(str)
            label = np.zeros(r, dtype=bool)
            label[np.arange(nq) * group + rng.integers(0, group, nq)] = True
            batch = pa.record_batch([
                pa.array(qids), pa.array(np.char.add(qids, np.tile(np.arange(group), nq).astype(str))),
                pa.ListArray.from_arrays(offsets, pa.array(qf.ravel())),
                pa.ListArray.from_arrays(offsets, pa.array(cf.ravel())),
                pa.array(rng.standard_normal(r)), pa.array(label)], schema=schema)
            writer.write_batch(batch)
            rows += r
    return rows


if __name__ == "__main__":
    write_table(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
