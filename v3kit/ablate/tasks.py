"""What a grid runs: its SFT tasks and (world, variant, seed) run tasks, and which SFT checkpoint each run starts
from (:class:`_SFTPlan`: one SFT per world and distinct model/sft settings, trained once and shared)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..config import RunConfig
from ..provenance import fingerprint, signature
from .grid import _SHARED_SECTIONS, BASE_WORLD, GridSpec


def _sft_hash(cfg: RunConfig) -> str:
    # select: best_val keeps SFT's best val epoch (v3kit.train.selection): another checkpoint. Only then is it part
    # of the key, so the SFT checkpoints of earlier grids (select: last) stay valid.
    salt = f"select=best_val:{cfg.select_metric}" if cfg.select == "best_val" else ""
    return fingerprint(signature(cfg, *_SHARED_SECTIONS), salt)


@dataclass
class _SFTTask:
    world: str
    cfg: RunConfig
    path: Path
    hash: str


@dataclass
class _RunTask:
    world: str
    variant: str
    seed: int
    cfg: RunConfig
    split_cfg: RunConfig  # the world's SFT config: its seed fixes the split
    sft_path: Path
    result_path: Path
    hash: str
    keep_checkpoints: bool = False
    tracking: dict[str, Any] | None = None  # report_to: the tracked run's tags and default MLflow store


class _SFTPlan:
    """Which SFT checkpoint each run starts from, and the SFT trainings still to do.

    A run whose model/sft settings equal its world's base starts from the world's SFT (``<world>/sft/sft.pt``, or
    the grid's ``sft_checkpoint`` in the base world); a variant that changes ``model.*`` or ``sft.*`` gets the SFT of
    its own settings (``<world>/sft-<hash>/sft.pt``), shared by every variant and seed with the same settings; a
    run with ``sft.checkpoint`` starts from that file.
    """

    def __init__(self, out: Path, spec: GridSpec, sft_cfgs: dict[str, RunConfig]) -> None:
        self.out, self.spec, self.sft_cfgs = out, spec, sft_cfgs
        self.pending: dict[Path, _SFTTask] = {}

    def _given(self, path: Path, cfg: RunConfig) -> tuple[Path, str]:
        """A given checkpoint: what the result depends on is its path, size and mtime."""
        st = path.stat()
        return path, f"{path}:{st.st_size}:{st.st_mtime_ns}:{_sft_hash(cfg)}"

    def sft_for(self, world: str, variant: str, cfg: RunConfig) -> tuple[Path, str]:
        """(the SFT checkpoint the run starts from, the key its result depends on of that SFT)."""
        if cfg.sft.checkpoint:
            return self._given(Path(cfg.sft.checkpoint).resolve(), cfg)
        base = self.sft_cfgs[world]
        sft_cfg = dataclasses.replace(base, model=cfg.model, sft=cfg.sft)
        h = _sft_hash(sft_cfg)
        own = h != _sft_hash(base) or variant in self.spec.retrain_sft
        if own:  # its own SFT, which keeps its best val epoch under the variant's select
            sft_cfg = dataclasses.replace(sft_cfg, select=cfg.select, select_metric=cfg.select_metric)
            if self.spec.sft_per_seed:
                sft_cfg = dataclasses.replace(sft_cfg, seed=cfg.seed)
            h = _sft_hash(sft_cfg)
        if not own:
            if world == BASE_WORLD and self.spec.sft_checkpoint is not None:
                return self._given(Path(self.spec.sft_checkpoint).resolve(), base)
            folder = self.out / world / "sft"
        else:
            folder = self.out / world / f"sft-{h[:12]}"
            sft_cfg = dataclasses.replace(sft_cfg, run_dir=str(folder))
        path = folder / "sft.pt"
        hash_file = folder / "sft.hash"
        if not (path.exists() and hash_file.exists() and hash_file.read_text() == h) and path not in self.pending:
            self.pending[path] = _SFTTask(world=world, cfg=sft_cfg, path=path, hash=h)
        return path, h

    def tasks_for(self, runs: Iterable[_RunTask]) -> list[_SFTTask]:
        """The SFT trainings ``runs`` still need (each handed out once)."""
        need = {r.sft_path for r in runs}
        out = [t for p, t in self.pending.items() if p in need]
        for t in out:
            del self.pending[t.path]
        return out
