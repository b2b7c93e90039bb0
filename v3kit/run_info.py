"""``run_info.json``, beside a run's ``config.yaml``: what the run started from that its config does not say (the
SFT checkpoint and its sha256, the split seed of an ablation run, what ``reward.debias`` did), read by ``eval``, the
doctor, ``investigate`` and a resume (which refuses another SFT model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import ConfigError
from .provenance import config_changes, flatten
from .rundir import atomic_write_text, file_sha256

RUN_INFO = "run_info.json"  # beside config.yaml: what a run started from that the config does not say


OWN_SFT = "sft.pt"  # run_info's name for the SFT model the run trained itself (relative: the run dir may move)


def check_same_sft(run_dir: Path, sft_checkpoint: str | Path | None) -> dict[str, Any] | None:
    """On resume, the RCE/GRPO checkpoints belong to one SFT model: refuse to continue them from another one."""
    path = run_dir / RUN_INFO
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(
            f"cannot resume {run_dir}: {path} is not valid JSON; delete it only if you are sure the "
            "SFT checkpoint is the one the run started from"
        ) from None
    if sft_checkpoint is None and info.get("sft_checkpoint") != OWN_SFT:
        raise ConfigError(
            f"cannot resume {run_dir}: it was started from --sft {info['sft_checkpoint']}; pass the "
            "same --sft to resume it"
        )
    return info


def record_sft_checkpoint(run_dir: Path, sft_path: Path, given: bool, recorded: dict[str, Any] | None) -> None:
    """Remember which SFT checkpoint (path and sha256) the run's later stages are built on: ``v3kit eval`` finds
    the ``kl_to_sft`` reference with it, and a resume from another SFT model is refused."""
    if not sft_path.is_file():  # a missing one fails later with load_sft's message
        return
    digest = file_sha256(sft_path)
    if recorded is not None and recorded.get("sft_sha256") != digest:
        raise ConfigError(
            f"cannot resume {run_dir}: it was started from the SFT checkpoint {recorded['sft_checkpoint']} "
            f"(sha256 {str(recorded.get('sft_sha256'))[:12]}...), but {sft_path} has sha256 {digest[:12]}...; "
            "resume with the same --sft, or use a new run_dir"
        )
    name = str(sft_path.resolve()) if given else OWN_SFT
    atomic_write_text(run_dir / RUN_INFO, json.dumps({"sft_checkpoint": name, "sft_sha256": digest}) + "\n")


def record_config(run_dir: Path, cfg: Any) -> None:
    """Keep the config the run trained with: ``config.yaml`` is a text a user may edit afterwards, and what reads
    the run later (``investigate``) must know whether it still describes the run (:func:`config_edits`)."""
    update_run_info(run_dir, config=dataclasses.asdict(cfg))


def config_edits(run_dir: str | Path, cfg: Any) -> str:
    """``"key: old -> new, ..."`` for the keys where ``cfg`` (read from the run's ``config.yaml`` now) differs from
    the config the run recorded when it trained; ``""`` when they agree or the run predates the record."""
    recorded = read_run_info(run_dir).get("config")
    if not isinstance(recorded, dict):
        return ""
    return config_changes(flatten(recorded), flatten(dataclasses.asdict(cfg)), ignore=EDITABLE_KEYS)


# Keys that change where or how visibly a run trains, not what it trains: editing them changes no number.
EDITABLE_KEYS = ("run_dir", "progress", "report_to", "threads", "log_every", "device")


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``run_info.json`` as a dict; ``{}`` when it is missing or unreadable (runs that predate it).
    A resume reads it strictly instead (:func:`check_same_sft`): there a damaged file must not pass silently."""
    path = Path(run_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def update_run_info(run_dir: str | Path, **values: Any) -> None:
    """Merge ``values`` into the run's ``run_info.json`` (e.g. ``split_seed`` of an ablation run, whose split comes
    from the shared SFT's seed rather than its own)."""
    info = read_run_info(run_dir)
    info.update(values)
    atomic_write_text(Path(run_dir) / RUN_INFO, json.dumps(info, indent=1) + "\n")


def recorded_split_seed(run_dir: str | Path) -> int | None:
    """The seed that split the run's data when it is not the run's own ``seed`` (ablation runs), else None."""
    seed = read_run_info(run_dir).get("split_seed")
    return seed if isinstance(seed, int) else None


def recorded_sft_checkpoint(run_dir: str | Path) -> Path | None:
    """The SFT checkpoint :func:`record_sft_checkpoint` stored for ``run_dir`` (None for runs that predate it)."""
    recorded = read_run_info(run_dir).get("sft_checkpoint")
    return None if not recorded else Path(run_dir) / recorded  # an absolute path stays absolute
