"""What every import into a v3kit SFT checkpoint checks, and the write: the weights fit the model (every mismatch
reported at once), one forward pass on a probe batch gives finite scores, the logit temperature (read from the model,
refused when its scores already use it), and the checkpoint written in the shape
:func:`v3kit.train.sft.train_sft` writes. The imports themselves: :mod:`v3kit.train.import_state_dict` (a plain
state dict) and :mod:`v3kit.train.import_pretrained` (Hugging Face and sentence-transformers directories).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..data.contract import Batch, GroupData
from .checkpoint import CheckpointError, model_payload, save_checkpoint
from .model import ModelConfig, build_model, compute_log_probs, interface_of, model_inputs, scores


class StateDictMismatch(CheckpointError):
    """The state dict does not fit the model: ``missing``, ``unexpected`` and ``mismatched`` list every key."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def _rename_hints(missing: list[str], unexpected: list[str]) -> list[str]:
    """``old=new`` for top-level names whose sub-keys match exactly: the usual cause is a renamed attribute."""

    def groups(keys: list[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for k in keys:
            head, _, rest = k.partition(".")
            out.setdefault(head, set()).add(rest)
        return out

    miss, unexp = groups(missing), groups(unexpected)
    return [f"{u}={m}" for u, us in unexp.items() for m, ms in miss.items() if us == ms]


def fit_report(model: nn.Module, state: Mapping[str, Tensor], source: str | Path, target: str) -> None:
    """Raise :class:`StateDictMismatch` listing every missing, unexpected and shape-mismatched key (summary first)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    counts = ", ".join(
        f"{n} {what}"
        for n, what in (
            (len(missing), "missing"),
            (len(unexpected), "unexpected"),
            (len(mismatched), "shape-mismatched"),
        )
        if n
    )
    lines = [f"{source} does not fit {target} ({counts} key(s)); nothing was written"]
    lines += [f"  missing (in the model, not in the file): {k} {tuple(own[k].shape)}" for k in missing]
    lines += [f"  unexpected (in the file, not in the model): {k} {tuple(state[k].shape)}" for k in unexpected]
    lines += [f"  shape mismatch: {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
    hints = _rename_hints(missing, unexpected)
    if hints:
        renames = " ".join(f"--rename {h}" for h in hints)
        lines.append(f"  fix: the names differ only in their first part; try {renames}")
    elif mismatched:
        lines.append("  fix: build the model as it was trained: --query-dim/--cand-dim (or --config) and --kwargs")
    raise StateDictMismatch("\n".join(lines), missing, unexpected, mismatched)


def probe_batch(query_dim: int, cand_dim: int, groups: int = 1, size: int = 2, seed: int = 0) -> Batch:
    """A small batch of random features (and short texts, for text models) to call a model on."""
    g = torch.Generator().manual_seed(seed)
    return Batch(
        index=torch.arange(groups),
        query_x=torch.randn(groups, query_dim, generator=g),
        cand_x=torch.randn(groups, size, cand_dim, generator=g),
        mask=torch.ones(groups, size, dtype=torch.bool),
        labels=torch.zeros(groups, dtype=torch.long),
        rewards=torch.zeros(groups, size),
        utility=None,
        query_text=[f"query {i}" for i in range(groups)],
        cand_text=[[f"candidate {i} {j}" for j in range(size)] for i in range(groups)],
    )


def probe_scores(model: nn.Module, batch: Batch) -> Tensor:
    """The model's scores on ``batch`` in eval mode without gradients (its train/eval mode restored)."""
    training = model.training
    model.eval()  # no dropout noise: two calls must agree
    try:
        with torch.no_grad():
            return scores(model, *model_inputs(model, batch))
    finally:
        model.train(training)


def _check_forward(model: nn.Module, query_dim: int, cand_dim: int, target: str) -> None:
    """One forward pass on a small batch, so a model that cannot score this data's features fails here, not mid-run."""
    try:
        out = probe_scores(model, probe_batch(query_dim, cand_dim))
    except Exception as e:
        raise CheckpointError(
            f"{target} with the imported weights fails on features of dim (query {query_dim}, "
            f"candidate {cand_dim}) through its {interface_of(model).kind} interface: "
            f"{type(e).__name__}: {str(e)[:200]}"
        ) from None
    if not bool(torch.isfinite(out).all()):
        raise CheckpointError(f"{target} with the imported weights gives non-finite scores on a probe batch")


TEMPERATURE_FORMS = ("temperature", "scale", "log_scale")


def read_temperature(model: nn.Module, attr: str, form: str = "temperature") -> float:
    """The logit temperature a model holds as attribute, buffer or parameter ``attr`` (dotted for a submodule's):
    ``form`` ``temperature`` (scores are divided by it), ``scale`` (multiplied by it: T = 1 / value) or
    ``log_scale`` (multiplied by exp(value), CLIP's ``logit_scale``: T = exp(-value))."""
    if form not in TEMPERATURE_FORMS:
        raise ValueError(f"--temperature-form must be one of {TEMPERATURE_FORMS}, got {form!r}")
    node: Any = model
    for part in attr.split("."):
        if not hasattr(node, part):
            names = sorted(n for n, _ in [*model.named_parameters(), *model.named_buffers()] if "." not in n)
            raise ValueError(
                f"--temperature-attr {attr!r}: {type(model).__name__} has no attribute {part!r} "
                f"(its own parameters and buffers: {names})"
            )
        node = getattr(node, part)
    if isinstance(node, Tensor):
        if node.numel() != 1:
            raise ValueError(f"--temperature-attr {attr!r} is a tensor of shape {tuple(node.shape)}, not one number")
        value = float(node.detach().reshape(()))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        value = float(node)
    else:
        raise ValueError(f"--temperature-attr {attr!r} is a {type(node).__name__}, not a number or a 1-element tensor")
    t = {
        "temperature": value,
        "scale": 1.0 / value if value else float("inf"),
        "log_scale": math.exp(-value) if value > -700 else float("inf"),
    }[form]
    if not (math.isfinite(t) and t > 0):
        raise ValueError(
            f"--temperature-attr {attr!r} = {value} (form {form}) gives the temperature {t}, which is "
            "not a positive number; check --temperature-form"
        )
    return t


def _swap(model: nn.Module, attr: str, value: Any) -> Any:
    """Set the number ``attr`` of ``model`` names (a tensor in place, or a Python attribute) to ``value``; returns
    the old value (a float for a tensor, else the attribute itself), which restores it exactly."""
    *parents, name = attr.split(".")
    node: Any = model
    for part in parents:
        node = getattr(node, part)
    current = getattr(node, name)
    if isinstance(current, Tensor):
        old = float(current.detach().reshape(()))
        with torch.no_grad():
            current.fill_(value)
    else:
        old = current
        setattr(node, name, value)
    return old


def temperature_in_scores(
    model: nn.Module, attr: str, form: str, query_dim: int, cand_dim: int, batch: Batch | None = None
) -> bool:
    """Whether the scores v3kit reads from ``model`` already use the temperature ``attr``: they are computed with
    it as it is and with it doubled (its log shifted by log 2 for ``log_scale``); any change means the model
    applies it itself, and dividing by ``sim_temperature`` too would apply it twice."""
    read_temperature(model, attr, form)  # a readable, positive temperature, else its one-line error
    batch = batch or probe_batch(query_dim, cand_dim, groups=4, size=3)
    before = probe_scores(model, batch)
    raw = _swap(model, attr, 0.0)
    changed = float(raw) + math.log(2.0) if form == "log_scale" else float(raw) * 2.0
    _swap(model, attr, changed)
    try:
        after = probe_scores(model, batch)
    finally:
        _swap(model, attr, raw)
    return not torch.allclose(before, after, rtol=1e-4, atol=1e-6)


def entropy_share(model: nn.Module, data: GroupData, temperature: float, max_groups: int = 2048) -> float:
    """Mean entropy of the model's group policy as a share of the mean log G (1 = uniform), on up to
    ``max_groups`` groups of ``data``."""
    if len(data) > max_groups:
        data = data.subset(list(range(max_groups)))
    logp = compute_log_probs(model, data, temperature)
    valid = torch.isfinite(logp)
    h = -torch.where(valid, logp.exp() * logp, torch.zeros_like(logp)).sum(dim=1)
    log_g = valid.sum(dim=1).clamp_min(1).double().log()
    return float(h.double().mean() / log_g.mean()) if float(log_g.mean()) > 0 else 0.0


NEAR_UNIFORM = 0.95  # entropy share above which the imported policy is reported as nearly uniform


def temperature_twice_message(attr: str, model: nn.Module) -> str:
    return (
        f"--temperature-attr {attr}: {type(model).__name__}'s scores already use {attr} (they change when it "
        "changes), so dividing by it again would apply it twice; either drop --temperature-attr (sim_temperature "
        "stays 1, your scores already hold it) or score through methods that leave it out (--methods / "
        "--interface towers) and keep --temperature-attr; nothing was written"
    )


def write_import(
    model: nn.Module,
    cfg: ModelConfig,
    out: str | Path,
    query_dim: int,
    cand_dim: int,
    target: str,
    provenance: dict[str, Any],
    temperature_attr: str | None = None,
    temperature_form: str = "temperature",
) -> Path:
    """Read the temperature (refused when the scores already use it), check one forward pass, write ``out``."""
    if temperature_attr is not None:
        t = read_temperature(model, temperature_attr, temperature_form)
        if temperature_in_scores(model, temperature_attr, temperature_form, query_dim, cand_dim):
            raise ValueError(temperature_twice_message(temperature_attr, model))
        cfg = dataclasses.replace(cfg, sim_temperature=t)
    _check_forward(model, query_dim, cand_dim, target)
    payload = {
        "stage": "sft",
        "epoch": 0,
        "step": -1,
        "model": model.state_dict(),
        **model_payload(cfg, query_dim, cand_dim),
        "imported_from": provenance,  # provenance only; nothing reads it back
    }
    return save_checkpoint(out, payload)


def model_changes(
    sim_temperature: float | None,
    interface: str | None,
    methods: Mapping[str, str] | None,
    temperature_attr: str | None,
) -> dict[str, Any]:
    """The ``ModelConfig`` fields an import's arguments override (``dataclasses.replace`` applies them)."""
    if sim_temperature is not None and temperature_attr is not None:
        raise ValueError("give either --sim-temperature or --temperature-attr, not both")
    changes: dict[str, Any] = {}
    if sim_temperature is not None:
        changes["sim_temperature"] = float(sim_temperature)
    if interface is not None:
        changes["interface"] = interface
    if methods is not None:
        changes["methods"] = dict(methods)
    return changes


def build_imported(cfg: ModelConfig, query_dim: int, cand_dim: int) -> nn.Module:
    """:func:`v3kit.train.model.build_model`, with a class that is not a ranker as a one-line ValueError."""
    try:
        return build_model(cfg, query_dim, cand_dim)
    except TypeError as e:  # not a ranker: a one-line message, not a traceback
        raise ValueError(str(e)) from None


def check_dims(query_dim: int, cand_dim: int, allow_zero: bool = False) -> None:
    """Refuse feature dims that are not positive integers (0 allowed with ``allow_zero``)."""
    for name, dim in (("query_dim", query_dim), ("cand_dim", cand_dim)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < (0 if allow_zero else 1):
            raise ValueError(f"{name} must be a positive integer, got {dim!r}")
