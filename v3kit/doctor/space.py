"""The declared search space of ``v3kit investigate`` (``configs/search_space.yaml``; its header documents the
format): load and validate it, sample a trial's config from it, and express a fixed variant (a doctor's remedy) as
a point of it, so Optuna can enqueue it as a first trial."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import ConfigError, all_keys, load_config, resolve_config_file, safe_load_bounded, to_dict
from ..provenance import flatten

DEFAULT_SPACE = "configs/search_space.yaml"
RETRAIN_SFT = "retrain_sft"  # the one search key that is not a RunConfig key: train a new SFT in the trial
CONDITIONS = ("own_sft", "builtin_model", "same_dims", "recurring_ids")
_ENTRY_KEYS = {"int", "float", "choices", "log", "step", "if", "needs", "key"}


@dataclass(frozen=True)
class Param:
    name: str  # Optuna's parameter name (the YAML entry's name)
    key: str  # the RunConfig key it sets (or retrain_sft)
    kind: str  # int | float | choices
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[str, Any] | None = None  # (name or key, value) or (name or key, None): truthy
    needs: tuple[str, ...] = ()

    def contains(self, value: Any) -> bool:
        if self.kind == "choices":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high


def _fail(path: Path | str, name: str, why: str) -> ConfigError:
    return ConfigError(f"search space {path}: {name}: {why}")


def _check_value(path: Path | str, name: str, key: str, value: Any) -> None:
    """A value must make a valid RunConfig (right type, in the key's own bounds)."""
    if key == RETRAIN_SFT:
        if not isinstance(value, bool):
            raise _fail(path, name, f"{RETRAIN_SFT} takes true/false, got {value!r}")
        return
    try:
        load_config(None, [f"{key}={override_value(value)}"])
    except ConfigError as e:
        raise _fail(path, name, str(e)) from None


def _param(path: Path | str, name: str, raw: Any, known: set[str]) -> Param:
    if not isinstance(raw, Mapping):
        raise _fail(path, name, f"expects a mapping such as {{float: [1e-5, 1e-3], log: true}}, got {raw!r}")
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise _fail(path, name, f"unknown field(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}")
    key = str(raw.get("key", name))
    if key != RETRAIN_SFT and key not in known:
        close = difflib.get_close_matches(key, [*known, RETRAIN_SFT], n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else "see docs/config.md"
        raise _fail(path, name, f"'{key}' is not a config key; {hint}")
    kinds = [k for k in ("int", "float", "choices") if k in raw]
    if len(kinds) != 1:
        raise _fail(path, name, "give exactly one of int: [low, high], float: [low, high], choices: [...]")
    kind = kinds[0]
    needs = tuple(raw.get("needs", ()))
    bad = [n for n in needs if n.lstrip("!") not in CONDITIONS]
    if bad:
        raise _fail(path, name, f"needs {bad}: the conditions are {list(CONDITIONS)} (prefix ! to negate)")
    when = raw.get("if")
    if when is not None:
        when = (when, None) if isinstance(when, str) else tuple(when)
        if len(when) != 2 or not isinstance(when[0], str):
            raise _fail(path, name, f"if: KEY or if: [KEY, VALUE], got {raw.get('if')!r}")
    if kind == "choices":
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise _fail(path, name, f"choices must be a non-empty list, got {choices!r}")
        for c in choices:
            _check_value(path, name, key, c)
        return Param(name, key, kind, choices=tuple(choices), when=when, needs=needs)
    bounds = raw[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) for b in bounds)):
        raise _fail(path, name, f"{kind} expects [low, high], got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    log = bool(raw.get("log", False))
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
        raise _fail(path, name, f"needs finite low < high (and low > 0 on a log scale), got {bounds}")
    for b in bounds:
        _check_value(path, name, key, int(b) if kind == "int" else float(b))
    return Param(name, key, kind, low, high, log, raw.get("step"), when=when, needs=needs)


def load_space(path: str | Path | None = None) -> list[Param]:
    """The parameters of a search-space YAML (default: the shipped ``configs/search_space.yaml``), each checked
    against :class:`v3kit.config.RunConfig`: a bad key, range or value is one line naming the entry."""
    path = resolve_config_file(path or DEFAULT_SPACE)
    if not Path(path).is_file():
        raise ConfigError(f"search space {path} does not exist; start from {DEFAULT_SPACE}")
    try:
        raw = safe_load_bounded(Path(path).read_text(), f"search space {path}") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"search space {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("params"), Mapping) or set(raw) - {"params"}:
        raise ConfigError(f"search space {path} must hold one mapping, params: {{KEY: RANGE, ...}}")
    known = set(all_keys())
    return [_param(path, str(n), r, known) for n, r in raw["params"].items()]


def active(params: Sequence[Param], conditions: Mapping[str, bool]) -> list[Param]:
    """The parameters whose ``needs`` this run meets (``conditions``: own_sft, builtin_model, ...)."""

    def ok(need: str) -> bool:
        return not conditions.get(need[1:], False) if need.startswith("!") else conditions.get(need, False)

    return [p for p in params if all(ok(n) for n in p.needs)]


def _holds(p: Param, by_key: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    if p.when is None:
        return True
    ref, want = p.when
    value = by_key.get(ref, base.get(ref, False))
    if want is None:
        return bool(value) and value != "none"
    return value == want


def run_values(base_overrides: Sequence[str]) -> dict[str, Any]:
    """The run's flattened config (what an ``if`` reads for a key the trial does not sample)."""
    return flatten(to_dict(load_config(None, base_overrides)))


def suggest(trial: Any, params: Sequence[Param], base: Mapping[str, Any]) -> dict[str, Any]:
    """Sample one trial's values (by parameter name) with Optuna's ``trial`` (define-by-run: a parameter whose
    ``if`` does not hold is not sampled). ``base``: :func:`run_values`, for ``if`` on an unsampled key."""
    values: dict[str, Any] = {}
    by_key: dict[str, Any] = {}
    for p in params:
        if p.key in by_key or not _holds(p, by_key, base):
            continue
        if p.kind == "choices":
            v = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            v = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            v = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
        values[p.name] = by_key[p.key] = v
    return values


def fixed_point(
    params: Sequence[Param], overrides: Sequence[str], base_overrides: Sequence[str]
) -> tuple[dict[str, Any], list[str]]:
    """A fixed variant (``overrides`` on top of the run's ``base_overrides``) as (parameter values to enqueue, the
    overrides the space cannot express): every parameter whose ``if`` holds takes the variant's value (the run's
    where the variant does not set it; a number outside its range is kept, Optuna accepts it, a choice the entry
    does not list becomes an override); ``retrain_sft`` is true when the variant changes ``sft.*`` or
    ``model.*``."""
    keys = [o.partition("=")[0] for o in overrides]
    flat = run_values([*base_overrides, *overrides])
    flat[RETRAIN_SFT] = any(k.startswith(("sft.", "model.")) for k in keys)
    values: dict[str, Any] = {}
    by_key: dict[str, Any] = {}
    outside: list[str] = []  # a value a categorical entry does not list (Optuna refuses it): an override instead
    for p in params:
        if p.key in by_key or not _holds(p, by_key, flat):
            continue
        by_key[p.key] = flat[p.key]
        if p.kind == "choices" and flat[p.key] not in p.choices:
            outside.append(f"{p.key}={override_value(flat[p.key])}")
        else:
            values[p.name] = flat[p.key]
    extra = [o for o, k in zip(overrides, keys) if k not in by_key]
    return values, extra + [o for o in outside if o not in extra]


def to_overrides(params: Sequence[Param], values: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(retrain_sft, the ``key=value`` overrides) of a trial's sampled ``values``."""
    by_name = {p.name: p for p in params}
    retrain = bool(values.get(RETRAIN_SFT, False))
    out = [f"{by_name[n].key}={override_value(v)}" for n, v in values.items() if by_name[n].key != RETRAIN_SFT]
    return retrain, out


def override_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)
