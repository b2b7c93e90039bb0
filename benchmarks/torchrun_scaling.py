"""What ``torchrun`` buys on this machine: the same run in one process and in N ranks, side by side.

    python benchmarks/torchrun_scaling.py [--ranks 2] [--quick]

Runs ``python -m v3kit run`` with one config three ways, one after the other: one process on 1 thread, one process
on N threads, and ``torchrun --standalone --nproc_per_node N`` (1 thread per rank). Each is timed from start to
exit (process start-up, data, stage 1, every epoch and evaluation) at 1 and at 5 SFT epochs; the difference / 4 is
the time of one more SFT epoch, the part that scales with the data. The fastest of ``--repeats`` runs is kept, and
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
SETS = [
    "progress=false",
    "data.synthetic.group_size=16",
    "data.synthetic.min_group_size=16",
    "data.synthetic.feature_dim=384",
    "model.hidden=[512,512]",
    "model.emb_dim=128",
    "sft.batch_size=256",
    "rce.batch_size=256",
    "grpo.batch_size=256",
    "rce.epochs=0",
    "grpo.epochs=1",
]


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
    ap.add_argument("--quick", action="store_true", help="1,000 queries instead of 3,000")
    args = ap.parse_args(argv)
    n_q = 1000 if args.quick else 3000
    ways = [
        ("one process, 1 thread", 1, 1),
        (f"one process, {args.ranks} threads", 1, args.ranks),
        (f"torchrun, {args.ranks} ranks x 1 thread", args.ranks, 1),
    ]
    epochs = (1, 5)
    with tempfile.TemporaryDirectory() as tmp:
        times = {(name, e): [] for name, _, _ in ways for e in epochs}
        for rep in range(args.repeats):
            for e in epochs:
                sets = SETS + [f"data.synthetic.n_queries={n_q}", f"sft.epochs={e}"]
                for i, (name, ranks, threads) in enumerate(ways):
                    times[name, e].append(run(Path(tmp) / f"{i}_{e}_{rep}", ranks, threads, sets))
        tables = [
            pd.read_csv(Path(tmp) / f"{i}_{e}_0" / "summary.csv").select_dtypes("number")
            for e in epochs
            for i in range(len(ways))
        ]
    gap = max(float((t - tables[0 if k < len(ways) else len(ways)]).abs().max().max()) for k, t in enumerate(tables))
    print(
        f"{n_q:,} queries x 16 candidates x 384-d, towers 512-512-128, batch 256, SFT 1 or 5 epochs + GRPO 1 "
        f"epoch; {os.cpu_count()} cores; fastest of {args.repeats}"
    )
    print(f"  {'':<32} {'total, 5 SFT epochs':>20} {'one more SFT epoch':>20}")
    best = {k: min(v) for k, v in times.items()}
    base_total, base_epoch = best[ways[0][0], 5], (best[ways[0][0], 5] - best[ways[0][0], 1]) / 4
    for name, _, _ in ways:
        total, epoch = best[name, 5], (best[name, 5] - best[name, 1]) / 4
        print(f"  {name:<32} {total:7.1f} s ({base_total / total:4.2f}x) {epoch:10.2f} s ({base_epoch / epoch:4.2f}x)")
    print(f"  stage tables agree to {gap:.1e}")
    if gap > 1e-5:
        sys.exit("the stage tables differ by more than 1e-5")


if __name__ == "__main__":
    main()
