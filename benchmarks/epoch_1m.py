"""One SFT epoch over 1M groups x 16 candidates x 384-d features on this machine, from v3kit's memory-mapped cache.

The long-form Parquet file of that size would be ~49 GB (the query vector repeats on every row), so this script
writes the packed cache arrays directly, in chunks (float16 features: 12.3 GB), opens them the way
``data.cache: true`` does (:func:`v3kit.data.cache.open_cache`) and trains one SFT epoch through ``train_sft``.
It prints the epoch time, the peak RSS and the anonymous (non file-backed) RSS at the end.

    python benchmarks/epoch_1m.py --dir /tmp/v3kit_1m [--groups 1000000] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from v3kit.data import GroupData, Splits
from v3kit.data.cache import open_cache
from v3kit.train.model import ModelConfig
from v3kit.train.sft import SFTConfig, train_sft

G, DIM, CHUNK = 16, 384, 4_000


def _status(key: str) -> float:
    """A /proc/self/status field in GB (VmHWM: peak RSS; RssAnon: memory not backed by a file)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def _write_npy(path: Path, shape: tuple[int, ...], dtype: type, chunks) -> None:
    """An .npy file written chunk by chunk with plain writes (a memory map would count every page in our RSS)."""
    header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    offset = header.offset
    del header
    with open(path, "r+b") as f:
        f.seek(offset)
        for arr in chunks:
            f.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())


def write_cache(where: Path, n: int, seed: int = 0) -> None:
    """The arrays of a cached dataset (v3kit.data.cache's layout), random features, one label per group."""
    where.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(where / "mask.npy", np.ones((n, G), dtype=bool))
    np.save(where / "labels.npy", rng.integers(0, G, n))
    np.save(where / "rewards.npy", rng.standard_normal((n, G), dtype=np.float32))
    np.save(where / "query_ids.npy", np.char.add("q", np.arange(n).astype(str)))
    spans = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    _write_npy(
        where / "query_x.npy",
        (n, DIM),
        np.float16,
        (rng.standard_normal((e - s, DIM), dtype=np.float32) for s, e in spans),
    )
    _write_npy(
        where / "cand_x.npy",
        (n, G, DIM),
        np.float16,
        (rng.standard_normal((e - s, G, DIM), dtype=np.float32) for s, e in spans),
    )


def small(n: int, seed: int) -> GroupData:
    g = torch.Generator().manual_seed(seed)
    return GroupData(
        query_x=torch.randn(n, DIM, generator=g),
        cand_x=torch.randn(n, G, DIM, generator=g),
        mask=torch.ones(n, G, dtype=torch.bool),
        labels=torch.randint(0, G, (n,), generator=g),
        rewards=torch.randn(n, G, generator=g),
        query_ids=[f"v{i}" for i in range(n)],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/v3kit_1m")
    ap.add_argument("--groups", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--keep", action="store_true", help="keep the cache files (12.3 GB at 1M groups)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    where = Path(args.dir)
    t0 = time.perf_counter()
    write_cache(where, args.groups)
    t_write = time.perf_counter() - t0
    train = open_cache(where)
    held_out = small(1000, 1)
    splits = Splits(train=train, val=held_out, test=held_out)
    base_hwm, base_anon = _status("VmHWM"), _status("RssAnon")
    t0 = time.perf_counter()
    result = train_sft(splits, ModelConfig(), SFTConfig(epochs=1, batch_size=args.batch_size), progress=True)
    t_epoch = time.perf_counter() - t0
    payload = (train.cand_x.numel() + train.query_x.numel()) * 2 / 1e9
    print(
        f"groups {args.groups:,} x {G} x {DIM}-d (float16 features: {payload:.1f} GB on disk); cache written in "
        f"{t_write:.0f} s; one SFT epoch ({len(result.train_history)} steps of {args.batch_size}) in "
        f"{t_epoch:.0f} s; peak RSS {_status('VmHWM'):.2f} GB (before the epoch {base_hwm:.2f} GB, file-backed "
        f"pages of the memory map included); anonymous RSS {_status('RssAnon'):.2f} GB (before {base_anon:.2f} GB); "
        f"final val acc@1 {result.final_metrics['acc@1']:.3f}"
    )
    if not args.keep:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
