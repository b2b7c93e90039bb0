"""The smoke grid (v3kit/configs/ablate_smoke.yaml: 2 SFTs, 14 runs) on 2 CPUs, side by side: the local backend
in one process and with 2 worker processes, and a local 2-CPU Ray (its start-up timed apart), each from an empty
output directory. Checks that the three give the same results.csv (bar wall times and paths).

    python benchmarks/ray_vs_local.py [--out DIR]

Prints one table (docs/scaling.md quotes it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from v3kit.ablate import load_grid, run_grid  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="scratch directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="v3kit-ray-vs-local-"))
    spec = load_grid("configs/ablate_smoke.yaml")
    rows = []

    def grid(name: str, **kw) -> float:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        return timed(lambda: run_grid(spec, out, progress=False, **kw))

    rows.append(("local, 1 process", 0.0, grid("local1", workers=1)))
    rows.append(("local, --workers 2", 0.0, grid("local2", workers=2)))
    import ray

    start = timed(lambda: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
    rows.append(("ray, local 2-CPU cluster", start, grid("ray", backend="ray")))
    ray.shutdown()

    frames = {
        name: pd.read_csv(root / name / "results.csv").drop(columns=["wall_s", "run_dir"])
        for name in ("local1", "local2", "ray")
    }
    same = all(frames["local1"].equals(f) for f in frames.values())
    print(
        f"smoke grid ({len(frames['ray'].groupby(['world', 'variant', 'seed']))} runs, 2 SFTs) on {os.cpu_count()} CPUs"
    )
    print(f"{'':28s}{'start-up':>10s}{'grid':>10s}{'total':>10s}")
    for name, s, g in rows:
        print(f"{name:28s}{s:9.1f}s{g:9.1f}s{s + g:9.1f}s")
    print(f"results.csv identical across the three: {same}")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
