"""``v3kit ablate``: run a grid and print its summary and conclusions."""

from __future__ import annotations

import argparse
from typing import Any

from ..bounds import cli_number
from .backends import BACKENDS, RAY_INSTALL
from .grid import load_grid
from .report import conclusions, format_summary
from .runner import run_grid
from .stats import compare
from .tasks import STACK_MODES

MAX_WORKERS = 1024  # worker processes: more than any machine's cores is a typo


def cmd_ablate(args: argparse.Namespace) -> int:
    spec = load_grid(args.grid, args.set or [])
    res = run_grid(
        spec,
        args.out,
        workers=args.workers,
        progress=not args.no_progress,
        keep_checkpoints=args.keep_checkpoints,
        backend=args.backend,
        address=args.address,
        stack=args.stack,
    )
    summary = res.summary()
    print(
        f"\n{res.executed} run(s) executed, {res.skipped} skipped (already done) in {res.wall_s:.0f} s; "
        f"results in {res.out_dir}"
    )
    print(format_summary(summary))
    comparisons = compare(res.frame, res.per_query, spec.questions) if spec.questions else None
    print("\n" + conclusions(summary, reference=spec.reference, comparisons=comparisons))
    return 0


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend`` / ``--address``, shared by every command that runs a grid."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: this machine (--workers processes); ray: every SFT and run is a Ray task "
        f"(needs {RAY_INSTALL}; the out dir must be on a filesystem all Ray nodes share)",
    )
    p.add_argument(
        "--address",
        help="with --backend ray: an existing Ray cluster (e.g. ray://head:10001 or auto); "
        "default: start a local Ray on this machine",
    )


def add_stack_arg(p: argparse.ArgumentParser) -> None:
    """``--stack``, shared by every command that runs a grid."""
    p.add_argument(
        "--stack",
        choices=STACK_MODES,
        default="auto",
        help="auto: train the seeds of a variant and the numeric variants of one structure as one stacked model "
        "(then the runs left alone that differ only in switches), and the SFTs of one structure likewise (each "
        "run's files as if it ran alone; results.csv's 'stacked' column says which did; investigate searches one "
        "trial at a time when no trial's model would stack); off: every run alone",
    )


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ablate", help="run a grid of variants x seeds from one SFT checkpoint; print the summary with bootstrap CIs"
    )
    p.add_argument("--grid", required=True, help="grid YAML (e.g. configs/ablate_default.yaml)")
    p.add_argument("--out", help="output directory (default: runs/ablate/<grid name>)")
    p.add_argument(
        "--workers",
        type=cli_number(int, 1, MAX_WORKERS),
        default=1,
        help="parallel worker processes (one torch thread each; worker k on cuda:k mod #GPUs); with "
        "--backend ray and no --address: the CPUs of the local Ray",
    )
    add_backend_args(p)
    add_stack_arg(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override added to the grid's base")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's per-epoch checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ablate)
