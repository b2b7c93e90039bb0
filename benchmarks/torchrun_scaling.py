"""What ``torchrun`` buys on this machine: the same run in one process and in N ranks, side by side.

    python benchmarks/torchrun_scaling.py [--ranks 2] [--quick]

Runs ``python -m v3kit run`` with one config three ways, one after the other: one process on 1 thread, one process
on N threads, and ``torchrun --standalone --nproc_per_node N`` (1 thread per rank). Each is timed from start to
exit (process start-up, data, stage 1, every epoch and evaluation), the fastest of ``--repeats`` runs is kept, and
the stage tables (``summary.csv``) must agree to 1e-5 or the script fails. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

# realistic towers on 384-d features (the size where the towers, not the bookkeeping, are a step's cost)
SETS = ["progress=false", "data.synthetic.group_size=16", "data.synthetic.min_group_size=16",
        "data.synthetic.feature_dim=384", "model.hidden=[512,512]", "model.emb_dim=128",
        "sft.batch_size=256", "rce.batch_size=256", "grpo.batch_size=256", "rce.epochs=0", "grpo.epochs=1"]


def run(run_dir: Path, ranks: int, threads: int, sets: list[str]) -> float:
    args = [a for s in [*sets, f"run_dir={run_dir}", f"threads={threads}"] for a in ("--set", s)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "v3kit", "run", *args]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={ranks}", "-m", "v3kit", "run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{out.stderr[-3000:]}")
    return took


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1,000 queries and 1 SFT epoch instead of 3,000 and 2")
    args = ap.parse_args(argv)
    n_q, sft_epochs = (1000, 1) if args.quick else (3000, 2)
    sets = SETS + [f"data.synthetic.n_queries={n_q}", f"sft.epochs={sft_epochs}"]
    ways = [("one process, 1 thread", 1, 1), (f"one process, {args.ranks} threads", 1, args.ranks),
            (f"torchrun, {args.ranks} ranks x 1 thread", args.ranks, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        times = {name: [] for name, _, _ in ways}
        for rep in range(args.repeats):
            for i, (name, ranks, threads) in enumerate(ways):
                times[name].append(run(Path(tmp) / f"{i}_{rep}", ranks, threads, sets))
        tables = [pd.read_csv(Path(tmp) / f"{i}_0" / "summary.csv").select_dtypes("number") for i in range(len(ways))]
    gap = max(float((t - tables[0]).abs().max().max()) for t in tables[1:])
    print(f"{n_q:,} queries x 16 candidates x 384-d, towers 512-512-128, batch 256, SFT {sft_epochs} epoch(s) + "
          f"GRPO 1 epoch; {os.cpu_count()} cores; fastest of {args.repeats}")
    base = min(times[ways[0][0]])
    for name, _, _ in ways:
        best = min(times[name])
        print(f"  {name:<32} {best:7.1f} s   speed-up {base / best:4.2f}x")
    print(f"  stage tables agree to {gap:.1e}")
    if gap > 1e-5:
        sys.exit("the stage tables differ by more than 1e-5")


if __name__ == "__main__":
    main()
