"""The grid spec of an ablation: variants x seeds (x synthetic worlds), parsed and validated from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..config import (
    PACKAGED_CONFIGS,
    ConfigError,
    RunConfig,
    load_config,
    parse_override,
    resolve_config_file,
    safe_load_bounded,
)
from ..provenance import RUNNER_KEYS
from ..train.metrics import METRIC_DIRECTION, METRIC_NAMES

KEY_METRICS = ("acc@1", "reward@1", "utility@1")
# The printed summary table: the label metrics (acc@1, mrr, ndcg@5), the reward, and the true utility where the data
# has one (a metric absent from the results is left out, never shown as an empty column).
SUMMARY_METRICS = ("acc@1", "mrr", "ndcg@5", "reward@1", "utility@1")
# Every metric is computed per test query, so the bootstrap can resample queries (ndcg@5 is undefined for
# queries whose rewards are all equal; those are dropped from its comparison).
PER_QUERY_METRICS = METRIC_NAMES
BASE_WORLD = "default"
BEST = "@best"
_RUN_INFO = ("step0_ratio_mean", "step0_ratio_std", "step0_ratio_min", "step0_ratio_max", "step0_outside_clip")
_SHARED_SECTIONS = ("data", "model", "sft")  # what an SFT checkpoint depends on (its hash)
_WORLD_SECTIONS = ("data",)  # fixed per world: every run of a world shares its split and test queries


# What a variant of a grid may change, for the config reference (docs/config.md): one home, next to the rule.
VARIANT_RULES = (
    "A grid's variants (`v3kit ablate`, `v3kit doctor --grid`, `v3kit investigate`) may set any key but `data.*` "
    "and the runner's (" + ", ".join(f"`{k}`" for k in RUNNER_KEYS) + "): every run of a world shares its split "
    "and test queries. A "
    "variant that changes `model.*` or `sft.*` (e.g. `model.residual=true`) gets the SFT model of its own settings, "
    "trained once per distinct setting and shared by every variant and seed that has it; the others start from the "
    "world's SFT (or the grid's `sft_checkpoint`)."
)


class GridError(ConfigError):
    """A grid spec is invalid; the message names the variant/world and the key."""


@dataclass
class WorldSweep:
    """The key comparison rerun in other synthetic worlds (``levels``: name -> overrides)."""

    levels: dict[str, list[str]]
    variants: list[str]
    seeds: list[int]
    best_metric: str = "utility@1"
    best_of: list[str] | None = None  # candidates for @best (default: every variant that runs GRPO, but the reference)


@dataclass
class GridSpec:
    variants: dict[str, list[str]]
    seeds: list[int]
    base: list[str] = field(default_factory=list)
    config: str | None = None
    reference: str | None = None
    sft_seed: int = 0
    questions: dict[str, tuple[str, str]] = field(default_factory=dict)
    worlds: WorldSweep | None = None
    name: str = "grid"
    # A given SFT checkpoint for the base world (e.g. your imported v2 model, or the SFT of the run a doctor grid
    # tests) instead of one trained by the grid; its split still comes from data.* with sft_seed.
    sft_checkpoint: str | None = None
    # A variant that trains its own SFT (it changes model.* or sft.*) trains it with each run's seed instead of
    # sft_seed: its intervals then cover the SFT's seed noise too (v3kit investigate's confirm phase).
    sft_per_seed: bool = False
    # Variants that train their own SFT even with the base's settings (v3kit investigate's retrained SFT).
    retrain_sft: list[str] = field(default_factory=list)

    def base_config(self, world: str = BASE_WORLD, extra: Sequence[str] = ()) -> RunConfig:
        return load_config(self.config, [*self.base, *self.world_overrides(world), *extra])

    def world_overrides(self, world: str) -> list[str]:
        if world == BASE_WORLD:
            return []
        if self.worlds is None or world not in self.worlds.levels:
            raise GridError(f"unknown world {world!r}; the grid has {self.world_names()}")
        return list(self.worlds.levels[world])

    def world_names(self) -> list[str]:
        return [BASE_WORLD] + (list(self.worlds.levels) if self.worlds else [])

    def resolve(self, world: str, variant: str, seed: int, run_dir: str | Path = "runs/ablate") -> RunConfig:
        """The full config of one run (raises :class:`GridError` naming the variant and key on a bad override)."""
        runner = [f"seed={seed}", f"run_dir={run_dir}", "progress=false"]
        try:
            return load_config(
                self.config, [*self.base, *self.world_overrides(world), *self.variants[variant], *runner]
            )
        except GridError:
            raise
        except ConfigError as e:
            raise GridError(f"variant {variant!r} (world {world!r}): {e}") from None

    def value(self, variant: str, key: str, world: str = BASE_WORLD) -> Any:
        """The resolved value of dotted ``key`` in a variant's config (e.g. for sweep plot axes)."""
        node: Any = self.resolve(world, variant, self.seeds[0])
        for part in key.split("."):
            node = getattr(node, part)
        return node


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GridError(f"{where} must be a list of 'key=value' strings, got {value!r}")
    return list(value)


def _seed_list(value: Any, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise GridError(f"{where} must be a non-empty list of integers, e.g. [0, 1, 2]; got {value!r}")
    if len(set(value)) != len(value):
        raise GridError(f"{where} has repeated seeds: {value}")
    return list(value)


def _check_keys(raw: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise GridError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def parse_grid(
    raw: Mapping[str, Any], *, name: str = "grid", extra_base: Sequence[str] = (), base_dir: str | Path | None = None
) -> GridSpec:
    """Build and validate a :class:`GridSpec` from a mapping (the parsed YAML); every run config is resolved once
    here so that a typo fails before any training, with the variant and key in the message."""
    if not isinstance(raw, Mapping):
        raise GridError(f"a grid must be a mapping with 'variants' and 'seeds', got {type(raw).__name__}")
    _check_keys(
        raw,
        (
            "name",
            "config",
            "base",
            "seeds",
            "sft_seed",
            "reference",
            "variants",
            "questions",
            "worlds",
            "sft_checkpoint",
        ),
        "grid",
    )
    sft_checkpoint = raw.get("sft_checkpoint")
    if sft_checkpoint is not None:
        if not isinstance(sft_checkpoint, str):
            raise GridError(f"grid.sft_checkpoint must be a path, got {sft_checkpoint!r}")
        if not Path(sft_checkpoint).exists() and base_dir is not None and (Path(base_dir) / sft_checkpoint).exists():
            sft_checkpoint = str(Path(base_dir) / sft_checkpoint)  # relative to the grid file
        if not Path(sft_checkpoint).is_file():
            raise GridError(
                f"grid.sft_checkpoint {sft_checkpoint} does not exist (a path from the cwd or the grid file)"
            )
        if raw.get("worlds"):
            raise GridError(
                "grid.sft_checkpoint fixes the base world's SFT; 'worlds' change the data and need their own "
                "SFT: drop one of the two"
            )
    config = raw.get("config")
    if config is not None and base_dir is not None and not Path(config).exists():
        config = str(Path(base_dir) / config)  # relative to the grid file when not relative to the cwd
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise GridError("grid.variants must be a non-empty mapping of name -> list of 'key=value' overrides")
    variants = {str(k): _str_list(v, f"variant {k!r}") for k, v in variants_raw.items()}
    for vname, overrides in variants.items():
        for text in overrides:
            try:
                keys, _ = parse_override(text)
            except ConfigError as e:
                raise GridError(f"variant {vname!r}: {e}") from None
            if keys[0] in _WORLD_SECTIONS:
                raise GridError(
                    f"variant {vname!r} sets '{'.'.join(keys)}', but data.* is fixed per world (every run "
                    "of a world is compared on the same test queries); move it to 'base' or to a world "
                    "in 'worlds.levels'"
                )
            if keys[0] in RUNNER_KEYS:
                raise GridError(
                    f"variant {vname!r} sets '{keys[0]}', which the runner sets for every run; use "
                    "the grid's 'seeds' (or 'sft_seed') instead"
                )
    seeds = _seed_list(raw.get("seeds"), "grid.seeds")
    sft_seed = raw.get("sft_seed", 0)
    if not isinstance(sft_seed, int):
        raise GridError(f"grid.sft_seed must be an integer, got {sft_seed!r}")
    reference = raw.get("reference")
    if reference is not None and reference not in variants:
        raise GridError(f"grid.reference {reference!r} is not a variant; variants: {list(variants)}")
    questions = {}
    for q, pair in (raw.get("questions") or {}).items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in variants for p in pair)):
            raise GridError(f"question {q!r} must be [variant_a, variant_b] naming two variants, got {pair!r}")
        questions[str(q)] = (pair[0], pair[1])
    worlds = None
    if raw.get("worlds"):
        w = raw["worlds"]
        _check_keys(w, ("levels", "variants", "seeds", "best_metric", "best_of"), "grid.worlds")
        levels = w.get("levels")
        if not isinstance(levels, Mapping) or not levels:
            raise GridError("grid.worlds.levels must map a world name to a list of overrides")
        if BASE_WORLD in levels:
            raise GridError(f"grid.worlds.levels may not use the name {BASE_WORLD!r} (the base world)")
        wvars = w.get("variants")
        if not isinstance(wvars, list) or not wvars:
            raise GridError("grid.worlds.variants must list the variants to rerun, e.g. [sft_only, seed, '@best']")
        for v in wvars:
            if v != BEST and v not in variants:
                raise GridError(f"grid.worlds.variants names {v!r}, which is not a variant (or '{BEST}')")
        best_metric = w.get("best_metric", "utility@1")
        if best_metric not in METRIC_DIRECTION or METRIC_DIRECTION[best_metric] == 0:
            raise GridError(
                f"grid.worlds.best_metric must be one of "
                f"{[m for m, d in METRIC_DIRECTION.items() if d]}, got {best_metric!r}"
            )
        best_of = w.get("best_of")
        if best_of is not None and (not isinstance(best_of, list) or any(b not in variants for b in best_of)):
            raise GridError(f"grid.worlds.best_of must list variants, got {best_of!r}")
        worlds = WorldSweep(
            levels={str(k): _str_list(v, f"world {k!r}") for k, v in levels.items()},
            variants=list(wvars),
            seeds=_seed_list(w.get("seeds", seeds), "grid.worlds.seeds"),
            best_metric=best_metric,
            best_of=best_of,
        )
    spec = GridSpec(
        variants=variants,
        seeds=seeds,
        base=[*_str_list(raw.get("base"), "grid.base"), *extra_base],
        config=config,
        reference=reference,
        sft_seed=sft_seed,
        questions=questions,
        worlds=worlds,
        name=str(raw.get("name", name)),
        sft_checkpoint=sft_checkpoint,
    )
    for world in spec.world_names():  # resolve everything now: fail fast, naming the culprit
        try:
            spec.base_config(world)
        except ConfigError as e:
            raise GridError(f"{'base' if world == BASE_WORLD else f'world {world!r}'}: {e}") from None
        for vname in variants:
            spec.resolve(world, vname, seeds[0])
    return spec


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> GridSpec:
    """Read a grid YAML; ``overrides`` (``--set``) are appended to its ``base``."""
    path = find_grid(path)
    try:
        raw = safe_load_bounded(path.read_text(), f"grid file {path}", GridError)  # refuses YAML bombs
    except yaml.YAMLError as e:
        raise GridError(f"grid file {path} is not valid YAML: {e}") from None
    return parse_grid(raw, name=path.stem, extra_base=overrides, base_dir=path.parent)


def find_grid(grid: str | Path) -> Path:
    """``grid`` if it exists from the cwd, else the shipped grid of that name (so ``configs/ablate_smoke.yaml``
    works from ``notebooks/``, a papermill temp dir or a non-editable install)."""
    path = resolve_config_file(grid)
    if not path.exists():
        raise GridError(
            f"grid file {grid} found neither from {Path.cwd()} nor among the shipped grids ({PACKAGED_CONFIGS})"
        )
    return path


def single_key_variants(spec: GridSpec, key: str) -> list[str]:
    """The reference plus every variant whose overrides set only ``key`` (a one-knob sweep), ordered by value."""
    found = [v for v, ov in spec.variants.items() if ov and all(".".join(parse_override(o)[0]) == key for o in ov)]
    if spec.reference is not None and spec.reference not in found:
        found.append(spec.reference)
    return sorted(found, key=lambda v: spec.value(v, key))
