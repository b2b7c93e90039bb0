"""Command line: ``v3kit run``, ``v3kit eval``, and the commands defined next to their logic (``ablate``, ``doctor``,
``import-sft``, ``investigate``, ``notebook``: each module's ``register_cli``)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from .ablate import register_cli as register_ablate
from .config import ConfigError, load_config
from .data.contract import DataValidationError, GroupData
from .doctor import register_cli as register_doctor
from .doctor.investigate import RECOMMENDED
from .doctor.investigate_cli import register_cli as register_investigate
from .doctor.verdict_report import VERDICT_JSON, VERDICT_MD
from .notebook.tools import register_cli as register_notebook
from .pipeline import RUN_INFO, load_data, prepare_data, recorded_sft_checkpoint, run_pipeline
from .run import Run
from .rundir import DISK_FULL_ERRNOS, UNKNOWN_FILE, DiskFullError, RunDirBusyError, free_bytes
from .train import distributed
from .train.checkpoint import (
    CheckpointError,
    check_feature_dims,
    checkpoint_model_config,
    load_checkpoint,
    model_from_checkpoint,
)
from .train.import_sft import register_cli as register_import_sft
from .train.metrics import evaluate, metric_order
from .train.model import ModelConfig
from .train.training import NonFiniteError


def _fmt(table: pd.DataFrame) -> str:
    return table.to_string(float_format=lambda x: f"{x:.4f}")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set or [])
    # With --sft the checkpoint's dims are checked on the first embedded text, before the rest is embedded.
    run = Run(cfg, expect_dims=_checkpoint_dims(args.sft) if args.sft else None, warn=False)
    ranks = distributed.init_from_env(run.runtime.device)  # torchrun: join the process group; else one process
    if ranks.world > 1:
        # One CPU thread per rank: N ranks x N threads would oversubscribe the cores.
        cfg = dataclasses.replace(
            cfg, progress=cfg.progress and ranks.main, threads=1 if run.runtime.device.type == "cpu" else cfg.threads
        )
        run = Run(cfg, splits=run.splits, warn=False)
    if ranks.main:
        ranks_note = f", {ranks.world} ranks (torchrun)" if ranks.world > 1 else ""
        print(f"v3kit run: {run.runtime.describe()}{ranks_note} (run dir: {cfg.run_dir})")
    result = run_pipeline(cfg, sft_checkpoint=args.sft, resume=args.resume, splits=run.splits)
    if not ranks.main:
        return 0
    if result.debias is not None:
        print(result.debias.line())
    print(f"\nheld-out test metrics by stage (run dir: {result.run_dir})")
    print(_fmt(stages_that_ran(result.table, cfg)))
    if result.selection is not None:
        print(textwrap.fill(result.selection.line(), 100, break_on_hyphens=False))
    g = result.grpo.info
    if cfg.grpo.epochs > 0:
        print(
            f"\nGRPO step-0 ratio: mean {g['step0_ratio_mean']:.4f}, min {g['step0_ratio_min']:.4f}, "
            f"max {g['step0_ratio_max']:.4f}, outside clip range {g['step0_outside_clip']:.1%}"
            f"{step0_ratio_note(g['step0_ratio_mean'])}"
        )
    else:
        print()
    if result.skipped_batches:
        counts = ", ".join(f"{k} {v}" for k, v in result.skipped_batches.items())
        print(f"batches skipped for a non-finite loss/gradient (on_nonfinite=skip_batch): {counts}")
    print(f"GRPO health report: v3kit doctor {result.run_dir}")
    print(recommendation_line(args.config) or f"What to ship instead: v3kit investigate {result.run_dir}")
    return 0


def stages_that_ran(table: pd.DataFrame, cfg: Any) -> pd.DataFrame:
    """The stage table without the rows of stages whose epochs are 0 (their model is the previous stage's)."""
    skipped = [s for s in ("rce", "grpo") if getattr(cfg, s).epochs == 0]
    return table.drop(index=[s for s in skipped if s in table.index])


def recommendation_line(config: str | None) -> str | None:
    """For a run of ``investigate``'s ``recommended.yaml``: what the run is and what to compare it with (its
    verdict), instead of sending the user to investigate it again. None for any other config."""
    if config is None or Path(config).name != RECOMMENDED:
        return None
    verdict_path = Path(config).parent / VERDICT_JSON
    try:
        v = json.loads(verdict_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(v, dict) or Path(str(v.get("config", ""))).resolve() != Path(config).resolve():
        return None
    out = Path(config).resolve().parent
    run = v.get("run_dir") or (out.parent if out.name == "investigate" else "the run it investigated")
    effect = v.get("effect_vs_sft")
    interval = ""
    if isinstance(effect, list) and len(effect) == 3 and all(isinstance(x, (int, float)) for x in effect):
        interval = f"'s {v.get('metric', 'metric')} effect vs SFT {effect[0]:+.4f} [{effect[1]:+.4f}, {effect[2]:+.4f}]"
    return (
        f"this is investigate's recommendation for {run} ({v.get('variant')}); compare with the verdict"
        f"{interval} in {verdict_path.with_name(VERDICT_MD)}"
    )


def _checkpoint_dims(path: str) -> tuple[int, int, str] | None:
    """The feature dims a checkpoint takes, read before the data is embedded (None when it lacks them: the
    checkpoint's own loader reports that)."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("query_dim"), int) or not isinstance(ckpt.get("cand_dim"), int):
        return None
    return ckpt["query_dim"], ckpt["cand_dim"], str(path)


def step0_ratio_note(mean: float) -> str:
    """What a step-0 ratio mean far from 1 says (empty when it is near 1: the policy GRPO starts from is the old
    policy, up to what RCE moved)."""
    if 0.5 <= mean <= 2.0:
        return ""
    return (
        f"\n  a step-0 ratio mean of {mean:.4g} (1 = GRPO starts from the old policy) says the old policy is stale "
        "(RCE moved the policy far from SFT: test grpo.old_policy=refresh_at_start) or the log-probs are read at "
        "another temperature than stage 1's (grpo.logp_temperature, rce.temperature_target=logits); v3kit doctor "
        "tells which"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint)
    run_dir = Path(args.checkpoint).parent
    cfg_path = Path(args.config) if args.config else run_dir / "config.yaml"
    cfg = load_config(cfg_path if cfg_path.exists() else None, args.set or [])
    splits = prepare_data(cfg, expect_dims=_checkpoint_dims(args.checkpoint))
    data = getattr(splits, args.split)
    check_feature_dims(
        ckpt,
        data.query_dim,
        data.cand_dim,
        args.checkpoint,
        "pass the config the checkpoint was trained with (--config)",
    )
    reference, why_missing = None, None
    ref_path = _reference_path(args.reference, run_dir)
    if isinstance(ref_path, str):
        why_missing = ref_path
    else:
        reference = model_from_checkpoint(load_checkpoint(ref_path), ref_path)
    temperature = float(ckpt.get("temperature", checkpoint_model_config(ckpt, args.checkpoint).sim_temperature))
    metrics = evaluate(model, data, temperature=temperature, reference=reference)
    table = pd.DataFrame([metrics], index=[f"{ckpt.get('stage')} epoch {ckpt.get('epoch')}"])
    table = table[metric_order(table.columns)]
    print(f"{args.split} metrics of {args.checkpoint}")
    print(_fmt(table))
    if why_missing:
        print(f"kl_to_sft not shown: {why_missing}; pass the SFT checkpoint the run started from with --reference CKPT")
    return 0


def _reference_path(given: str | None, run_dir: Path) -> Path | str:
    """The SFT checkpoint ``kl_to_sft`` is measured against, or a string saying why there is none.

    Order: ``--reference``; the one the run recorded in ``run_info.json`` (``run --sft`` may have started from a file
    outside the run dir); ``sft.pt`` beside the checkpoint (run dirs written before runs recorded it).
    """
    if given:
        return Path(given)  # a missing file fails in load_checkpoint with its own message
    recorded = recorded_sft_checkpoint(run_dir)
    if recorded is not None:
        if recorded.is_file():
            return recorded
        return f"the run started from {recorded} (per {run_dir / RUN_INFO}), which no longer exists"
    if (run_dir / "sft.pt").is_file():
        return run_dir / "sft.pt"
    return f"no {RUN_INFO} or sft.pt in {run_dir} says which SFT checkpoint this one started from"


class UsageError(SystemExit):
    """A command line argparse refuses (an unknown flag, a value out of its bounds): :func:`main` prints it as one
    line with exit code 2 instead of argparse's usage block. A ``SystemExit``, so callers that parse arguments
    themselves see what argparse would raise."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(2)
        self.prog, self.message = prog, message


class Parser(argparse.ArgumentParser):
    """argparse, with errors raised as :class:`UsageError` (subcommands inherit the class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self.prog, f"{message}; see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="v3kit", description="SFT -> RCE -> GRPO research kit for embedding rankers")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run SFT (or load --sft) -> stage 1 -> RCE -> GRPO and print the stage table")
    run.add_argument("--config", help="YAML config (default: the seed settings, configs/seed.yaml)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. grpo.kl_beta=0.01")
    run.add_argument("--sft", metavar="CKPT", help="existing v2 SFT checkpoint to start from")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoints in run_dir")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="held-out metrics of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("--config", help="config the checkpoint's data came from (default: config.yaml beside it)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE")
    ev.add_argument("--split", choices=("val", "test"), default="test")
    ev.add_argument(
        "--reference",
        metavar="CKPT",
        help="SFT checkpoint for kl_to_sft (default: the one the run recorded, else sft.pt beside it)",
    )
    ev.set_defaults(func=cmd_eval)

    # Subcommands defined next to their logic.
    register_ablate(sub)
    register_doctor(sub)
    register_import_sft(sub, data_from_config=import_sft_data)
    register_investigate(sub)
    register_notebook(sub)
    return p


def import_sft_data(args: argparse.Namespace) -> tuple[GroupData, ModelConfig]:
    """``v3kit import-sft --config/--set``: the run's data (loaded, and embedded for text, exactly as the run will
    use it, built-in tables too: the feature dims are the data's) and its model section."""
    cfg = load_config(args.config, args.set or [])
    return load_data(cfg), cfg.model


RESUME_HINTS = {  # how each command continues after a full disk was freed
    "run": "free space, then `--resume` (or point run_dir at another disk)",
    "ablate": "free space, then rerun the same command (finished runs are kept)",
    "investigate": "free space, then rerun the same command (finished runs are kept)",
    "import-sft": "free space (or choose another --out), then rerun",
}


def os_error_message(e: OSError, command: str = "run") -> str:
    """One line for a failed read/write (disk full, read-only dir, a file where a dir belongs): file, cause, fix."""
    if e.errno in DISK_FULL_ERRNOS:
        full = (
            e
            if isinstance(e, DiskFullError)
            else DiskFullError(e.filename or UNKNOWN_FILE, free=free_bytes(e.filename or "."))
        )
        return f"{full}; {RESUME_HINTS.get(command, 'free space, then rerun')}"
    if e.filename is None:  # raised by v3kit itself with its own message
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    cause = e.strerror or type(e).__name__
    if isinstance(e, PermissionError) or e.errno == errno.EROFS:
        fix = "make it writable or choose another run_dir"
    elif isinstance(e, (FileExistsError, NotADirectoryError)):
        fix = "a file is in the way of a directory: remove it or choose another run_dir"
    else:
        fix = "check the path exists, is a directory where one is expected, and is readable/writable"
    return f"{where}: {cause}; {fix}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e.message}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (
        ConfigError,
        DataValidationError,
        CheckpointError,
        NonFiniteError,
        RunDirBusyError,
        ValueError,
        OSError,
        ImportError,
    ) as e:
        # v3kit's errors name the field and the fix (ImportError: which extra to install); a traceback would only
        # bury that. V3KIT_DEBUG=1 shows it.
        if os.environ.get("V3KIT_DEBUG"):
            raise
        msg = os_error_message(e, args.command) if isinstance(e, OSError) else str(e)
        print(f"v3kit {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
