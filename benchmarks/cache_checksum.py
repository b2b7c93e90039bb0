"""What verifying the data cache costs: load time of a packed cache with and without its per-file CRC-32 check,
side by side in one run (the same rows appear in ``make bench``'s ingest section).

    python benchmarks/cache_checksum.py [--queries N] [--group G] [--dim D]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_table import write_table  # noqa: E402

from v3kit.data.cache import cache_dir, load_cached, open_cache  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        write_table(path, args.queries, args.group, args.dim)
        load_cached(path)  # build the cache
        where = cache_dir(path)
        size = sum(f.stat().st_size for f in where.glob("*.npy"))
        times: dict[str, list[float]] = {"verified (CRC-32 of every file)": [], "unverified (memory map only)": []}
        for _ in range(args.repeats):  # interleaved, so both see the same page cache and machine load
            for label, load in (
                ("verified (CRC-32 of every file)", lambda: load_cached(path)),
                ("unverified (memory map only)", lambda: open_cache(where)),
            ):
                t0 = time.perf_counter()
                load()
                times[label].append(time.perf_counter() - t0)
    print(
        f"data cache of {args.queries:,} queries x {args.group} x {args.dim}-d ({size / 1e6:.0f} MB), "
        f"median of {args.repeats} loads:"
    )
    for label, ts in times.items():
        print(f"  {label:<34} {statistics.median(ts) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
