"""Checkpoints: written atomically, read with ``weights_only=True``, validated with clear errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..rundir import atomic_write
from .device import to_cpu
from .model import ModelConfig, build_model, resolve_target

FORMAT = "v3kit-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what it is loaded into."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`v3kit.rundir.atomic_write`): a crash never leaves half a
    file.

    Tensors are stored on the CPU whatever device they come from, so any checkpoint loads on any machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **to_cpu(payload)}
    return atomic_write(path, lambda f: torch.save(payload, f), size_hint=lambda: payload_bytes(payload))


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts/lists): about what ``torch.save`` writes, for a full disk's
    message."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path, *, stage: str | None = None) -> dict[str, Any]:
    """Load and sanity-check a v3kit checkpoint; ``stage`` (``sft``/``rce``/``grpo``) is checked when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a v3kit checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "re-create it (e.g. rerun the stage) or point to another file"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a v3kit checkpoint (no '{FORMAT}' marker); was it saved by v3kit?")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}, this v3kit reads {VERSION}")
    if stage is not None and ckpt.get("stage") != stage:
        raise CheckpointError(f"{path} is a {ckpt.get('stage')!r} checkpoint, expected a {stage!r} one")
    return ckpt


def model_payload(model_cfg: ModelConfig, query_dim: int, cand_dim: int) -> dict[str, Any]:
    """The fields that rebuild the model. A file target is stored as an absolute path so the checkpoint loads from
    any working directory (moving the model file afterwards breaks it, with an error that says so)."""
    model_config = dict(vars(model_cfg))
    model_config["target"] = resolve_target(model_cfg.target)
    return {"model_config": model_config, "query_dim": query_dim, "cand_dim": cand_dim}


def load_state_into(model: nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``load_state_dict`` with an error that says which tensors mismatch instead of torch's wall of text."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k}: ckpt {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:4])
            )
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({'; '.join(parts)}); build the model with the checkpoint's "
            "model config and the same feature dims as the data it was trained on"
        )
    model.load_state_dict(state)


def check_feature_dims(ckpt: dict[str, Any], query_dim: int, cand_dim: int, path: str | Path, fix: str) -> None:
    """A checkpoint scores only data with the feature dims it was trained on; say which dims differ and ``fix``."""
    if (ckpt["query_dim"], ckpt["cand_dim"]) != (query_dim, cand_dim):
        raise CheckpointError(
            f"checkpoint {path} was trained on features of dim (query {ckpt['query_dim']}, candidate "
            f"{ckpt['cand_dim']}) but the data has ({query_dim}, {cand_dim}); {fix}"
        )


def require_fields(ckpt: dict[str, Any], path: str | Path, *names: str) -> None:
    """A v3kit-marked file missing a field would otherwise surface as a bare ``KeyError``."""
    missing = [n for n in names if n not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks the field(s) {missing}; it was not written by v3kit's stage "
            "runners (or is damaged): re-create it or point to another file"
        )


def checkpoint_model_config(ckpt: dict[str, Any], path: str | Path) -> ModelConfig:
    """The checkpoint's ``ModelConfig``; a field this v3kit does not know is refused by name, not a TypeError."""
    require_fields(ckpt, path, "model_config")
    raw = ckpt["model_config"]
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"checkpoint {path}: model_config must be a mapping, got {type(raw).__name__}; re-create the checkpoint"
        )
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(
            f"checkpoint {path}: model_config has field(s) {unknown} this v3kit does not know "
            f"(known: {sorted(known)}); it was written by another v3kit version: use that version "
            "or re-create the checkpoint"
        )
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: invalid model_config ({e}); re-create the checkpoint") from None


def nonfinite_tensors(state: Any, names: set[str] | None = None) -> list[str]:
    """Names of the floating-point tensors of ``state`` (a state dict) holding NaN or +-inf; ``names`` limits the
    check to those entries (a model's parameters: a buffer may hold -inf on purpose, e.g. an attention mask)."""
    if not isinstance(state, dict):
        return []
    return [
        k
        for k, v in state.items()
        if (names is None or k in names)
        and isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    ]


def check_finite_weights(
    state: Any,
    path: str | Path,
    names: set[str] | None = None,
    fix: str = "re-create it from a finite model, or use an earlier checkpoint",
) -> None:
    """Refuse weights with NaN/inf, naming the first tensors and how many there are: a NaN model evaluates to
    random-level metrics and trains to NaN, both without any other error. The one check every path that reads
    weights from outside a run uses (``eval``, ``run --sft``, ``import-sft``)."""
    bad = nonfinite_tensors(state, names)
    if bad:
        shown = ", ".join(bad[:4]) + (f", ... ({len(bad)} tensors)" if len(bad) > 4 else "")
        raise CheckpointError(f"{path} has non-finite weights (NaN/inf) in {shown}; {fix}")


def check_finite_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    """:func:`check_finite_weights` of a v3kit checkpoint's parameters (their names read off the model built on
    the meta device: no memory), before anything is built or written from it."""
    require_fields(ckpt, path, "model_config", "query_dim", "cand_dim", "model")
    names = None
    rng = torch.get_rng_state()
    try:
        with torch.device("meta"):
            model = build_model(checkpoint_model_config(ckpt, path), ckpt["query_dim"], ckpt["cand_dim"])
        names = {k for k, _ in model.named_parameters()}
    except CheckpointError:
        raise
    except Exception:  # a model that cannot be built on meta: check every floating tensor
        names = None
    finally:
        torch.set_rng_state(rng)
    check_finite_weights(ckpt["model"], path, names)


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> nn.Module:
    """Rebuild the model a checkpoint was trained with and load its weights (refused when any is NaN/inf)."""
    require_fields(ckpt, path, "model_config", "query_dim", "cand_dim", "model")
    model = build_model(checkpoint_model_config(ckpt, path), ckpt["query_dim"], ckpt["cand_dim"])
    load_state_into(model, ckpt["model"], path)
    check_finite_weights(ckpt["model"], path, {k for k, _ in model.named_parameters()})
    return model


_EPOCH_RE = re.compile(r"^(?P<stage>[a-z]+)_epoch(?P<epoch>\d+)\.pt$")


def epoch_checkpoints(run_dir: str | Path, stage: str) -> list[tuple[int, Path]]:
    """``[(epoch, path), ...]`` of ``{stage}_epoch{N}.pt`` files in ``run_dir``, sorted by epoch."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _EPOCH_RE.match(p.name)
        if m and m["stage"] == stage:
            found.append((int(m["epoch"]), p))
    return sorted(found)
