"""The run configuration: one dataclass tree, loaded from YAML plus ``key=value`` overrides.

The defaults *are* the seed's settings (``configs/seed.yaml`` spells them out). Unknown keys are errors that name
the closest valid key, so a typo never silently runs the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from .grpo import GRPOConfig
from .model import ModelConfig
from .rce import RCEConfig
from .sft import SFTConfig
from .synthetic import SyntheticConfig


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    path: str | None = None  # long-form Parquet/JSONL file; None = the synthetic world
    val_frac: float = 0.15
    test_frac: float = 0.15
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Keep a packed, memory-mapped copy of `path` in `<path>.v3kit-cache/` (rebuilt when the file changes), so a
    # second load is near-instant and features are paged in as batches touch them. See v3kit/cache.py.
    cache: bool = False
    # Storage dtype of the query/candidate features in memory and in the cache: float32 | float16 (half the
    # memory; batches are cast back to float32; values beyond ±65504 are refused).
    feature_dtype: str = "float32"

    def __post_init__(self) -> None:
        # Both held-out splits are needed: val for the per-epoch curves, test for the stage table.
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(f"data.val_frac ({self.val_frac}) and data.test_frac ({self.test_frac}) must each be "
                             "in (0, 1) and sum to < 1")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"data.feature_dtype must be 'float32' or 'float16', got {self.feature_dtype!r}")


@dataclass
class RunConfig:
    seed: int = 0
    run_dir: str = "runs/seed"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rce: RCEConfig = field(default_factory=RCEConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Light type check/coercion for YAML scalars; dataclass fields are built recursively by the caller."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _check_value(path, value, a)
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
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} expects a number, got {value!r}")
        return float(value)
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
    for name, hint in _field_types(cls).items():
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
    hints = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(path)
        hint = hints[key]
        kwargs[key] = from_dict(hint, value, path + ".") if dataclasses.is_dataclass(hint) else _check_value(
            path, value, hint)
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ validation already names the field
        raise ConfigError(str(e)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. grpo.kl_beta=0.01")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw)


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
            raise ConfigError(f"config file {path} does not exist (shipped configs: "
                              f"{sorted(p.name for p in PACKAGED_CONFIGS.glob('*.yaml'))})")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return from_dict(RunConfig, apply_overrides(raw, overrides))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
