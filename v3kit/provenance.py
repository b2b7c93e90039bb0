"""Is an artifact still valid for this config? One answer for checkpoints, run dirs, notebooks and ablations.

Every artifact (an SFT checkpoint, an RCE/GRPO epoch checkpoint, a run dir, an ablation result) was made from some
sections of the run config plus the seed. :func:`signature` extracts those sections, :func:`fingerprint` hashes a
signature for file names and result files, and :func:`config_changes` names the keys that differ when a resume or
a reuse must be refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence

# The top-level config keys that are not part of the experiment: where a run writes and where and how fast it
# computes. A resume may change them (pipeline.RESUMABLE_CHANGES) and an ablation's result hash leaves them out
# (ablate.runner), so results made with other values of these keys stay valid.
NOT_EXPERIMENT_KEYS = (
    "run_dir",  # where the outputs go; the same experiment may be (re)run anywhere
    "progress",  # tqdm bars only
    "device",  # where it computes: checkpoints and metrics.csv are device-independent
    "threads",  # CPU threads: how fast, not what is trained (at most float rounding differs)
    "candidate_table",  # shared candidates embedded once a batch: how fast, not what is trained (float rounding)
    "log_every",  # how often per-step statistics are copied to the host; metrics.csv still has every step
    "report_to",  # which experiment trackers also get the logged rows; metrics.csv is the same
)
# The keys the ablation runner sets for every run, so a grid's variant may not set them and a doctor grid's base
# leaves them out: the seed comes from the grid's seeds (it IS part of the experiment and of every result hash),
# run_dir and progress are the runner's (above).
RUNNER_KEYS = ("seed", "run_dir", "progress")


def experiment_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict (``dataclasses.asdict`` of a run config) as the experiment it describes: without
    :data:`NOT_EXPERIMENT_KEYS` and :data:`RUNNER_KEYS` but with its ``seed`` (a result's hash keeps it), and without
    ``precision`` when it is ``fp32`` (the precision of every result made before the key existed, which stay valid).
    The one home of which keys leave an experiment unchanged; resumes extend it (``pipeline.RESUMABLE_CHANGES``)."""
    out = {k: v for k, v in config.items() if k not in (*RUNNER_KEYS, *NOT_EXPERIMENT_KEYS)}
    if out.get("precision") == "fp32":
        out.pop("precision")
    out["seed"] = config["seed"]
    return out


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def signature(cfg: Any, *sections: str) -> dict[str, Any]:
    """``{"seed": cfg.seed, section: <section as a dict>, ...}``, JSON-normalised (tuples become lists, paths
    strings), so it compares equal to a copy read back from a JSON or YAML file."""
    out: dict[str, Any] = {"seed": cfg.seed}
    for name in sections:
        out[name] = dataclasses.asdict(getattr(cfg, name))
    return _jsonable(out)


def fingerprint(obj: Any, salt: str = "") -> str:
    """A short stable hash of a JSON-able object (keys sorted), e.g. of a :func:`signature`."""
    return hashlib.sha1((json.dumps(obj, sort_keys=True, default=str) + salt).encode()).hexdigest()[:16]


def flatten(d: Mapping[str, Any], prefix: str = "", *, whole: Sequence[str] = ("kwargs",)) -> dict[str, Any]:
    """Nested config dict -> ``{"grpo.kl_beta": 0.1, ...}``; the mappings named in ``whole`` (``kwargs``: a custom
    model's arguments) stay one value. The one home of config flattening."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k not in whole:
            out.update(flatten(v, f"{prefix}{k}.", whole=whole))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(before: dict[str, Any], now: dict[str, Any], ignore: Sequence[str] = (), limit: int = 5) -> str:
    """``"key: old -> new, ..."`` for the keys (outside ``ignore``) whose values differ; ``""`` when none do."""
    diff = sorted(k for k in set(before) | set(now) if k not in ignore and before.get(k) != now.get(k))
    return ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff[:limit])
