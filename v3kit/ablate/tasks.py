"""What a grid runs: its SFT tasks and (world, variant, seed) run tasks, and which SFT checkpoint each run starts
from (:class:`SFTPlan`: one SFT per world and distinct model/sft settings, trained once and shared)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from ..config import RunConfig
from ..provenance import fingerprint, signature
from ..run import split_seed
from ..stack_structure import stack_structure
from .grid import BASE_WORLD, SFT_SECTIONS, GridSpec


def _sft_hash(cfg: RunConfig) -> str:
    # select: best_val keeps SFT's best val epoch (v3kit.train.selection): another checkpoint. Only then is it part
    # of the key, so the SFT checkpoints of earlier grids (select: last) stay valid.
    salt = f"select=best_val:{cfg.select_metric}" if cfg.select == "best_val" else ""
    return fingerprint(signature(cfg, *SFT_SECTIONS), salt)


@dataclass
class SFTTask:
    world: str
    cfg: RunConfig
    path: Path
    hash: str


@dataclass
class RunTask:
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


class SFTPlan:
    """Which SFT checkpoint each run starts from, and the SFT trainings still to do.

    A run whose model/sft settings equal its world's base starts from the world's SFT (``<world>/sft/sft.pt``, or
    the grid's ``sft_checkpoint`` in the base world); a variant that changes ``model.*`` or ``sft.*`` gets the SFT of
    its own settings (``<world>/sft-<hash>/sft.pt``), shared by every variant and seed with the same settings; a
    run with ``sft.checkpoint`` starts from that file.
    """

    def __init__(self, out: Path, spec: GridSpec, sft_cfgs: dict[str, RunConfig]) -> None:
        self.out, self.spec, self.sft_cfgs = out, spec, sft_cfgs
        self.pending: dict[Path, SFTTask] = {}

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
            self.pending[path] = SFTTask(world=world, cfg=sft_cfg, path=path, hash=h)
        return path, h

    def tasks_for(self, runs: Iterable[RunTask]) -> list[SFTTask]:
        """The SFT trainings ``runs`` still need (each handed out once)."""
        need = {r.sft_path for r in runs}
        out = [t for p, t in self.pending.items() if p in need]
        for t in out:
            del self.pending[t.path]
        return out


# The numbers a stack's members may differ in (besides the seed): every one a stage reads per step or per epoch
# without changing the shape of the computation. Anything else (epochs, batch size, switches, model shape, data)
# makes another structure, hence another stack.
STACKABLE_NUMBERS = {
    "sft": ("lr", "max_grad_norm", "weight_decay"),
    "rce": ("lr", "max_grad_norm", "weight_decay", "t_start", "t_end", "reward_temperature", "label_weight"),
    "grpo": (
        "lr",
        "max_grad_norm",
        "weight_decay",
        "kl_beta",
        "eps_low",
        "eps_high",
        "dual_clip",
        "adv_eps",
        "baseline",
        "entropy_coef",
        "logp_temperature",
    ),
    "model": ("sim_temperature",),
}
STACK_MODES = ("auto", "off")
MAX_STACK = 16  # members per stack: past this the step is arithmetic-bound and the memory grows for nothing


@dataclass
class StackTask:
    """Runs of one world that train as one stacked model (:func:`plan_stacks`); the attributes label it."""

    tasks: list[RunTask]

    @property
    def world(self) -> str:
        return self.tasks[0].world

    @property
    def variant(self) -> str:
        return "+".join(dict.fromkeys(t.variant for t in self.tasks))

    @property
    def seed(self) -> str:
        return ",".join(str(s) for s in dict.fromkeys(t.seed for t in self.tasks))

    @property
    def cfg(self) -> RunConfig:
        return self.tasks[0].cfg


def _without_numbers(cfg: RunConfig, numbers: dict[str, tuple[str, ...]], salt: str) -> str:
    """The fingerprint of ``cfg`` without its seed, run dir and the stackable ``numbers`` (a ``null`` and a number
    are different structures: ``eps_high: null`` and ``dual_clip: null`` switch code)."""
    d = dataclasses.asdict(cfg)
    for key in ("seed", "run_dir", "progress"):
        d.pop(key, None)
    for section, names in numbers.items():
        for name in names:
            value = d[section].get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                d[section][name] = "<number>"
    return fingerprint(d, salt)


def _structure(task: RunTask) -> str:
    """What a stack's members must share: the run's config but for its seed and stackable numbers, and its world.
    Not the SFT checkpoint: each member starts from its own (a variant that trains its SFT has one per seed), and
    the config's ``model`` section, part of the structure, is what makes their models alike."""
    return _without_numbers(task.cfg, STACKABLE_NUMBERS, task.world)


def _mixed_structure(task: RunTask) -> str:
    """What the runs left alone by :func:`_structure` (a variant with one seed, the last of a split group) must
    share to stack with each other though they differ in switches: :func:`v3kit.stack_structure.stack_structure`,
    in one world. They are grouped only after the runs of one structure: those share their stacked objectives
    (one per switch setting, ``v3kit.train.stacked_losses.objective_key``), which mixing would split."""
    return fingerprint(stack_structure(task.cfg), task.world)


@dataclass
class SFTStackTask:
    """SFT trainings of one world that train as one stacked model (:func:`plan_sft_stacks`); ``world`` and ``cfg``
    (its first SFT's) label it, as a task's do."""

    tasks: list[SFTTask]
    world = property(lambda self: self.tasks[0].world)
    cfg = property(lambda self: self.tasks[0].cfg)


# what SFT members of one stack may differ in (their SFT's numbers and the head's temperature), besides the seed
SFT_STACKABLE = {k: STACKABLE_NUMBERS[k] for k in ("sft", "model")}


def _sft_structure(task: SFTTask) -> str:
    # members share one split: the world's data and the split's seed (a run's own seed unless data.split_seed)
    return _without_numbers(task.cfg, SFT_STACKABLE, f"{task.world}:split{split_seed(task.cfg)}")


T = TypeVar("T")


def _group(tasks: list[T], key: Callable[[T], str]) -> tuple[list[list[T]], list[T]]:
    """(groups of two or more tasks with one ``key``, at most :data:`MAX_STACK` each; the tasks left alone)."""
    groups: dict[str, list[T]] = {}
    for t in tasks:
        groups.setdefault(key(t), []).append(t)
    stacks, alone = [], []
    for members in groups.values():
        for i in range(0, len(members), MAX_STACK):
            chunk = members[i : i + MAX_STACK]
            if len(chunk) > 1:
                stacks.append(chunk)
            else:
                alone += chunk
    return stacks, alone


def plan_sft_stacks(tasks: Iterable[SFTTask], stack: str = "auto") -> tuple[list[SFTStackTask], list[SFTTask]]:
    """(stacks of two or more SFT trainings, SFTs left to train alone): with ``stack="auto"`` the SFTs of one
    world, split and structure (the per-seed SFTs of a variant, finalists that differ in the SFT's numbers) are
    grouped, at most :data:`MAX_STACK` per stack; ``"off"`` stacks none."""
    tasks = list(tasks)
    if stack == "off":
        return [], tasks
    stacks, alone = _group(tasks, _sft_structure)
    return [SFTStackTask(s) for s in stacks], alone


def plan_stacks(tasks: Iterable[RunTask], stack: str = "auto") -> tuple[list[StackTask], list[RunTask]]:
    """(stacks of two or more runs, runs left to run alone): with ``stack="auto"`` the seeds of a variant and the
    numeric variants of one structure are grouped, at most :data:`MAX_STACK` per stack, then the runs still alone
    that differ only in switches (:func:`_mixed_structure`); ``"off"`` stacks none."""
    if stack not in STACK_MODES:
        raise ValueError(f"stack must be one of {STACK_MODES}, got {stack!r}")
    tasks = list(tasks)
    if stack == "off":
        return [], tasks
    stacks, alone = _group(tasks, _structure)
    more, alone = _group(alone, _mixed_structure)
    return [StackTask(s) for s in [*stacks, *more]], alone
