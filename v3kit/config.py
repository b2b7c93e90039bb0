"""The run configuration: one dataclass tree, loaded from YAML plus ``key=value`` overrides.

The defaults *are* the seed's settings (``configs/seed.yaml`` spells them out). Unknown keys are errors that name
the closest valid key, so a typo never silently runs the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import yaml

from .bounds import MAX_CONFIG_FLOAT, MAX_CONFIG_INT, check_max
from .data.config import BUILTIN_TABLES, MAX_TEXT_TOKENS, DataConfig  # noqa: F401 - the run config's data section, re-exported
from .data.debias import RewardConfig
from .data.shared_candidates import check_mode as check_candidate_table
from .rundir import atomic_write_text
from .trackers import check_report_to
from .train.device import check_device_setting, check_precision_setting, check_threads_setting
from .train.grpo import GRPOConfig
from .train.metrics import METRIC_DIRECTION
from .train.model import ModelConfig
from .train.rce import RCEConfig
from .train.sft import SFTConfig

SELECT_MODES = ("last", "best_val")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _NonFinite(ConfigError):
    """A number key got NaN/inf or a value past every bound: propagated out of a Union's alternatives so the
    message keeps the reason."""


@dataclass
class RunConfig:
    seed: int = 0
    """Seeds the split, model init, batch order and sampling: same config + seed, same numbers."""
    run_dir: str = "runs/seed"
    """Where checkpoints, ``metrics.csv``, ``summary.csv`` and ``config.yaml`` go."""
    progress: bool = True
    """Show tqdm progress bars."""
    device: str = "auto"
    """Where the run computes: ``auto`` (cuda if available, else mps, else cpu) | ``cpu`` | ``cuda`` | ``cuda:N`` |
    ``mps``. Checkpoints and ``metrics.csv`` are device-independent, so a run may resume on another device."""
    precision: str = "fp32"
    """``fp32`` | ``bf16``: bf16 = ``torch.autocast(bfloat16)`` for every forward pass on CUDA; ignored (fp32, with
    a warning) elsewhere. Weights, gradients and optimizer state stay fp32."""
    threads: Union[str, int] = "auto"
    """Torch intra-op CPU threads, set at run start: ``auto`` = 1 on <= 2 cores, for small models (< 1M
    parameters) or on a GPU, else min(cores, 8); or a number from 1 to 4,096."""
    candidate_table: Union[str, bool] = "auto"
    """When the same candidates recur across groups (a table's ``candidate_id``s, e.g. queries routed to a fixed set
    of tools or intents), the candidate tower embeds each distinct candidate once per batch and the slots gather
    their embeddings: ``auto`` for the built-in ``TwoTower``; ``true`` for any towers model too (only if its
    candidate tower embeds each candidate on its own, not mixing a group's candidates); ``false``: never. Used when the candidates recur
    at least 4 times on average and a batch has at least twice as many slots as there are distinct candidates. How
    fast, not what is trained: scores differ by float rounding only."""
    log_every: int = 10
    """Per-step statistics stay on the device and are copied to the host (one sync) every ``log_every`` steps and
    at each epoch end; ``metrics.csv`` still gets one row per step, callbacks get them in batches. At most 10^9."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get every ``metrics.csv`` row (as ``<stage>/<split>/<column>``), the config and the
    stage table: any of ``tensorboard`` (event files in ``<run_dir>/tensorboard/``), ``mlflow``
    (``$MLFLOW_TRACKING_URI``, default the SQLite store ``./mlflow.db``, or ``./mlruns`` without MLflow's SQL dependencies; a grid's ``<out>/mlruns``) and ``wandb`` (offline unless logged
    in); e.g. ``report_to=[tensorboard,mlflow]``. Each is an optional extra (``pip install -e '.[mlflow]'``); see
    docs/tracking.md."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data: a long-form file, or the synthetic world."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The ranker."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Training of the v2 SFT model (skipped with ``v3kit run --sft CKPT``)."""
    rce: RCEConfig = field(default_factory=RCEConfig)
    """Stage 2, the RCE warm-up."""
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    """Stage 3, GRPO."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """What RCE and GRPO are paid with: the training rewards, optionally de-biased."""
    select: str = "last"
    """Which model the run ships: ``last`` (the end of the last stage that ran) | ``best_val`` (the checkpoint with
    the best ``select_metric`` on val across SFT and every RCE/GRPO epoch). Either way the stage table gets a
    ``selected`` row, and a run whose shipped model is below SFT on val says so."""
    select_metric: str = "acc@1"
    """The val metric ``select: best_val`` maximises (regret@1 is minimised); a metric the data lacks (utility@1 on
    real data) is refused when the run starts."""

    def __post_init__(self) -> None:
        if self.select not in SELECT_MODES:
            raise ValueError(f"select must be one of {SELECT_MODES}, got {self.select!r}")
        if METRIC_DIRECTION.get(self.select_metric, 0) == 0:
            raise ValueError(
                f"select_metric must be one of {[m for m, d in METRIC_DIRECTION.items() if d]}, "
                f"got {self.select_metric!r}"
            )
        check_device_setting(self.device)
        check_precision_setting(self.precision)
        check_threads_setting(self.threads)
        check_candidate_table(self.candidate_table)
        check_report_to(self.report_to)
        if self.log_every < 1:
            raise ValueError(
                f"log_every must be >= 1 (steps between host syncs of the step statistics), got {self.log_every}"
            )
        check_max("log_every", self.log_every, 10**9, "every epoch end syncs anyway; is the value a typo?")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _finite(path: str, value: float) -> float:
    """Every float key goes through here: NaN/inf would pass every later ``> 0`` check (NaN compares false both
    ways, inf is > 0) and train to NaN weights, so they are refused at load time, naming the key. So is a
    magnitude past :data:`~v3kit.bounds.MAX_CONFIG_FLOAT` (``sft.lr=1e300`` would otherwise end in a traceback
    from inside Adam, ``grpo.kl_beta=1e30`` in a non-finite loss blamed on the lr); fields with a narrower range
    check it beside their definition."""
    if not math.isfinite(value):
        raise _NonFinite(f"{path} must be a finite number, got {value!r}; set a finite value")
    if abs(value) > MAX_CONFIG_FLOAT:
        raise _NonFinite(
            f"{path} must be within +-{MAX_CONFIG_FLOAT:g} (the bound of every float key), got {value:g}; "
            "is the value a typo?"
        )
    return value


def _bounded_int(path: str, value: int) -> int:
    """Every int key goes through here (after its field's own check): past int64 no seed or size can reach torch
    (``threads=10**20`` failed in torch without naming its key)."""
    if abs(value) > MAX_CONFIG_INT:
        raise _NonFinite(
            f"{path} must be within +-{MAX_CONFIG_INT:_} (the bound of every integer key), got {value:.3g}; "
            "is the value a typo?"
        )
    return value


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Light type check/coercion for YAML scalars; dataclass fields are built recursively by the caller."""
    if isinstance(value, float):  # before the Union branch, whose fallback message would drop the reason
        _finite(path, value)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, str):  # "nan"/"inf" must not slip through as a str alternative
            try:
                value = _finite(path, float(value))  # YAML 1.1 reads "1e-9" (no dot) as a string: a number
            except ValueError as e:
                if isinstance(e, _NonFinite):
                    raise
        for a in (a for a in args if a is not type(None)):
            try:
                return _check_value(path, value, a)
            except _NonFinite:
                raise
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} fits none of {[getattr(a, '__name__', str(a)) for a in args]}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} expects true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} expects an integer, got {value!r}")
        return value  # its bound: the field's own check, else _bounded_int once the dataclass is built
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} expects a number, got {value!r}")
        try:
            return _finite(path, float(value))
        except OverflowError:  # an int literal past float64 (10**400)
            return _finite(path, math.inf)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} expects a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} expects a list, got {value!r}")
        return [_check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} expects a mapping, got {value!r}")
        return value
    return value


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (for error hints and docs)."""
    keys = []
    for name, hint in field_types(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, key + ".")
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see the README's config reference"
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type, raw: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and ill-typed values."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(path)
        hint = hints[key]
        kwargs[key] = (
            from_dict(hint, value, path + ".") if dataclasses.is_dataclass(hint) else _check_value(path, value, hint)
        )
    try:
        built = cls(**kwargs)
    except ValueError as e:  # __post_init__ validation already names the field
        raise ConfigError(str(e)) from None
    for key, value in kwargs.items():  # after the fields' own bounds, whose messages say more
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, int) and not isinstance(v, bool):
                _bounded_int(f"{prefix}{key}" + (f"[{i}]" if isinstance(value, list) else ""), v)
    return built


# A config or grid is a few hundred YAML nodes. Aliases are allowed (anchors are handy in grids), but a "billion
# laughs" of nested aliases expands to 10^9 nodes as soon as anything copies it (dataclasses.asdict, the resume
# check): counted before anything is constructed, its expanded size is refused in one line, in microseconds.
MAX_YAML_NODES = 100_000


def _expanded_nodes(node: yaml.Node, sizes: dict[int, float], open_: set[int]) -> float:
    """Nodes ``node`` stands for once every alias is expanded (an alias shares its target's node object, so each
    distinct node is counted once and reused: linear in the file); a node that contains itself is infinite."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        return math.inf
    open_.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1.0 + sum(_expanded_nodes(c, sizes, open_) for c in children)
    open_.discard(key)
    sizes[key] = total
    return total


def safe_load_bounded(text: str, source: str, error: type[Exception] = None) -> Any:  # type: ignore[assignment]
    """``yaml.safe_load`` that refuses, in one line naming ``source``, a document whose aliases expand to more than
    :data:`MAX_YAML_NODES` nodes or refer to themselves (``error``: the exception class, ConfigError by default).
    Syntax errors raise ``yaml.YAMLError`` as ``safe_load`` does."""
    error = error or ConfigError
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_nodes(node, {}, set())
        if size > MAX_YAML_NODES:
            what = (
                "refers to itself through an alias"
                if math.isinf(size)
                else f"expands to {int(size):_} nodes through its aliases"
            )
            raise error(
                f"{source} {what} (at most {MAX_YAML_NODES:_} allowed: a config is a few hundred); "
                "write the values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. grpo.kl_beta=0.01")
    key, _, raw = text.partition("=")
    try:
        value = safe_load_bounded(raw, f"override {key.strip()!r}")
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Merge ``a.b.c=value`` strings (values parsed as YAML) into a nested mapping."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
        node[keys[-1]] = value
    return raw


# The shipped configs and grids live inside the package (so a non-editable install has them too).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_file(path: str | Path) -> Path:
    """``path`` as given when it exists; else a shipped file, so ``configs/seed.yaml`` works from any directory."""
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    shipped = PACKAGED_CONFIGS.joinpath(*parts) if parts else PACKAGED_CONFIGS
    return shipped if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML config (or start from the defaults = the seed's settings) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_file(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist (shipped configs: "
                f"{sorted(p.name for p in PACKAGED_CONFIGS.glob('*.yaml'))})"
            )
        try:
            raw = safe_load_bounded(path.read_text(), f"config file {path}") or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of keys (e.g. 'grpo: {{kl_beta: 0.1}}'), "
                f"got a {type(raw).__name__}; see configs/seed.yaml"
            )
    return from_dict(RunConfig, apply_overrides(raw, overrides))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
