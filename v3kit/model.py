"""The two-tower ranker and the model protocol the stage runners rely on.

Any ``torch.nn.Module`` works in the stage runners if it has

* ``encode_query(query_x: Tensor[B, Dq]) -> Tensor[B, D]``
* ``encode_candidates(cand_x: Tensor[B, G, Dc]) -> Tensor[B, G, D]``

and a constructor accepting ``query_dim=`` and ``cand_dim=`` keyword arguments (plus whatever ``model.kwargs``
holds). Name it in the config as ``model.target: "mypkg.models:MyTwoTower"`` (importable) or
``model.target: "path/to/models.py:MyTwoTower"`` (a file). The policy over a group is
``softmax_c(<q, c> / model.sim_temperature)``; a model that L2-normalises its embeddings (cosine similarity)
usually wants a small ``sim_temperature`` such as 0.05.

A model MAY also define ``featurize(batch) -> (query_input, cand_input)`` to build its own inputs from a
:class:`~v3kit.data.Batch` (e.g. tokenised ``batch.query_text`` / ``batch.cand_text``, see
``v3kit.text_model.TextTwoTower``); those are then what ``encode_query`` / ``encode_candidates`` receive.
Without it they receive the feature tensors. Every stage feeds models through :func:`model_inputs`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from . import distributed
from .bounds import check_all_max, check_max
from .data import Batch, GroupData, iterate_batches
from .device import autocast, module_device
from .losses import group_log_probs

DEFAULT_TARGET = "v3kit.model:TwoTower"
# A layer 1,000,000 wide already holds 4 MB per input unit; wider is a typo (1e12 asked torch for 256 TB). What is
# in bounds but still too big for the machine is refused by the memory check before training (v3kit.bounds).
MAX_WIDTH = 1_000_000
WIDTH_WHY = "wider layers cannot be trained on one machine; is the value a typo?"


@runtime_checkable
class RankerModel(Protocol):
    def encode_query(self, query_x: Tensor) -> Tensor: ...

    def encode_candidates(self, cand_x: Tensor) -> Tensor: ...


@dataclass
class ModelConfig:
    target: str = DEFAULT_TARGET
    """The ranker class: ``package.module:Class`` (importable: installed or on PYTHONPATH) or
    ``path/to/models.py:Class`` (a file, relative to the cwd; checkpoints record its absolute path)."""
    hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden widths of each MLP tower; each at most 1,000,000 (``MAX_WIDTH``), at most 1,000 layers."""
    emb_dim: int = 32
    """Embedding dim D of both towers (the default ``TwoTower``); at most 1,000,000 (``MAX_WIDTH``)."""
    normalize: bool = False
    """L2-normalise embeddings (cosine similarity)."""
    sim_temperature: float = 1.0
    """Divides similarities before the group softmax."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor kwargs for a custom target."""
    residual: bool = False
    """Built-in ``TwoTower`` only: each tower is ``normalize(x + f(x))`` with f an MLP (``hidden``) whose last layer
    starts at zero, so the untrained model *is* the raw-feature cosine ranker and training learns a correction to
    it. Needs query and candidate features of one dim; ``emb_dim`` and ``normalize`` are then unused. Cosine scores
    lie in [-1, 1]: pair it with a small ``sim_temperature`` (e.g. 0.05-0.1) so the policy is not near uniform."""

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError("model.target must look like 'package.module:ClassName' or "
                             f"'path/to/models.py:ClassName', got {self.target!r}")
        if self.sim_temperature <= 0:
            raise ValueError(f"model.sim_temperature must be > 0, got {self.sim_temperature}")
        if self.emb_dim < 1 or any(w < 1 for w in self.hidden):
            raise ValueError(f"model.emb_dim and model.hidden widths must be >= 1, got {self.emb_dim} and "
                             f"{self.hidden}")
        check_max("model.emb_dim", self.emb_dim, MAX_WIDTH, WIDTH_WHY)
        check_all_max("model.hidden", self.hidden, MAX_WIDTH, WIDTH_WHY)
        check_max("model.hidden (number of layers)", len(self.hidden), 1_000, WIDTH_WHY)


def _mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.GELU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class ResidualTower(nn.Module):
    """``normalize(x + f(x))``: f's last layer is zero-initialised, so the tower starts as the identity on the
    direction of ``x`` (the raw features' cosine) and learns a correction."""

    def __init__(self, dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.f = _mlp(dim, hidden, dim)
        last = self.f[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x + self.f(x), dim=-1)


class TwoTower(nn.Module):
    """Query tower and candidate tower, each an MLP, scored by dot product (cosine if ``normalize``); with
    ``residual`` each tower is a :class:`ResidualTower` (cosine of the corrected raw features)."""

    def __init__(
        self, query_dim: int, cand_dim: int, hidden: list[int] = (64,), emb_dim: int = 32, normalize: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual:
            if query_dim != cand_dim:
                raise ValueError(f"model.residual needs query and candidate features of one dim, got {query_dim} and "
                                 f"{cand_dim}; set model.residual=false")
            self.query_tower: nn.Module = ResidualTower(query_dim, list(hidden))
            self.cand_tower: nn.Module = ResidualTower(cand_dim, list(hidden))
        else:
            self.query_tower = _mlp(query_dim, list(hidden), emb_dim)
            self.cand_tower = _mlp(cand_dim, list(hidden), emb_dim)
        self.normalize = normalize and not residual  # a residual tower already normalises

    def _out(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x, dim=-1) if self.normalize else x

    def encode_query(self, query_x: Tensor) -> Tensor:
        return self._out(self.query_tower(query_x))

    def encode_candidates(self, cand_x: Tensor) -> Tensor:
        return self._out(self.cand_tower(cand_x))


def is_file_target(target: str) -> bool:
    """``path/to/models.py:Cls`` names a file; ``pkg.models:Cls`` a module on the import path."""
    module_part = target.rpartition(":")[0]
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def resolve_target(target: str) -> str:
    """``target`` with a file path made absolute (against the current directory); module targets unchanged.

    Checkpoints record the resolved form, so ``eval`` and ``run --sft`` work from any directory later.
    """
    if not is_file_target(target):
        return target
    file_part, _, attr = target.rpartition(":")
    return f"{Path(file_part).expanduser().resolve()}:{attr}"


def _import_file(target: str, file_part: str) -> ModuleType:
    path = Path(file_part).expanduser().resolve()
    if not path.is_file():
        raise ValueError(
            f"model.target {target!r}: file {path} does not exist (a relative path is read from the current "
            f"directory, {Path.cwd()}; a checkpoint records the absolute path, so a moved model file must be "
            "imported again with v3kit import-sft, or use an importable module path pkg.module:Class)"
        )
    # One module per file (keyed by its absolute path) so every build of the class shares one class object.
    name = f"_v3kit_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"model.target {target!r}: {path} is not a Python file (it must end in .py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up through sys.modules
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"model.target {target!r}: importing {path} failed ({type(e).__name__}: {e})") from None
    return module


def import_object(target: str) -> Any:
    """The object ``target`` names: ``package.module:Name`` (importable) or ``path/to/file.py:Name``."""
    module_name, _, attr = target.rpartition(":")
    if is_file_target(target):
        module = _import_file(target, module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            missing = getattr(e, "name", None)
            if missing and (module_name == missing or module_name.startswith(missing + ".")):
                raise ValueError(
                    f"model.target {target!r}: cannot import module {module_name!r} ({e}); put the directory that "
                    f"holds {missing.split('.')[0]!r} on PYTHONPATH (e.g. PYTHONPATH=/path/to/project v3kit ...) "
                    "or name the file instead: model.target: path/to/models.py:ClassName"
                ) from None
            raise ValueError(f"model.target {target!r}: importing module {module_name!r} failed ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"model.target {target!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_model(cfg: ModelConfig, query_dim: int, cand_dim: int) -> nn.Module:
    """Instantiate ``cfg.target`` and check it follows the ranker protocol."""
    if cfg.residual and cfg.target != DEFAULT_TARGET:
        raise ValueError(f"model.residual applies to the built-in {DEFAULT_TARGET} only, not {cfg.target!r}; build "
                         "the residual into your own towers, or set model.residual=false")
    cls = import_object(cfg.target)
    kwargs = dict(cfg.kwargs)
    if cfg.target == DEFAULT_TARGET:
        kwargs.update(hidden=list(cfg.hidden), emb_dim=cfg.emb_dim, normalize=cfg.normalize)
        if cfg.residual:  # only when set: checkpoints of earlier versions rebuild with the same arguments
            kwargs["residual"] = True
    try:
        model = cls(query_dim=query_dim, cand_dim=cand_dim, **kwargs)
    except TypeError as e:  # a wrong keyword in model.kwargs, or a constructor without query_dim/cand_dim
        raise ValueError(f"model.target {cfg.target!r} could not be built with query_dim, cand_dim and "
                         f"model.kwargs={cfg.kwargs}: {e}") from None
    if not isinstance(model, nn.Module) or not isinstance(model, RankerModel):
        raise TypeError(
            f"model.target {cfg.target!r} built a {type(model).__name__}, which is not an nn.Module with "
            "encode_query(query_x) and encode_candidates(cand_x) methods"
        )
    if min(query_dim, cand_dim) == 0 and getattr(model, "featurize", None) is None:
        raise ValueError(f"the data has no feature vectors (text only, data.text_mode: end_to_end) but model.target "
                         f"{cfg.target!r} reads features; use model.target: v3kit.text_model:TextTwoTower or "
                         "data.text_mode: frozen")
    return model


def model_inputs(model: nn.Module, batch: Batch) -> tuple[Any, Any]:
    """What ``model.encode_query`` / ``encode_candidates`` take for ``batch``: ``model.featurize(batch)`` when the
    model defines it (e.g. tokenised text), else the feature tensors ``(batch.query_x, batch.cand_x)``; on the
    model's device."""
    featurize = getattr(model, "featurize", None)
    inputs = (batch.query_x, batch.cand_x) if featurize is None else featurize(batch)
    device = module_device(model)  # a batch (or a featurizer's tokens) may live elsewhere, e.g. on the CPU
    return tuple(x.to(device) if hasattr(x, "to") else x for x in inputs)  # type: ignore[return-value]


def policy_log_probs(
    model: nn.Module, query_x: Any, cand_x: Any, mask: Tensor, temperature: float
) -> Tensor:
    """Group log-probs ``log pi(c | q)`` of a ranker at a logit temperature (inputs: see :func:`model_inputs`)."""
    return group_log_probs(model.encode_query(query_x), model.encode_candidates(cand_x), temperature, mask)


def scores(model: nn.Module, query_x: Tensor, cand_x: Tensor) -> Tensor:
    """Raw similarities ``<q, c>`` [B, G] (ranking is temperature-free)."""
    return torch.einsum("bd,bgd->bg", model.encode_query(query_x), model.encode_candidates(cand_x))


@torch.inference_mode()
def compute_log_probs(model: nn.Module, data: GroupData, temperature: float, batch_size: int = 1024, *,
                      precision: str = "fp32") -> Tensor:
    """``log pi(c | q)`` for every group of ``data`` ([N, G], ``-inf`` at padding), in eval mode, no autograd.

    Computed on the model's device (``data`` may live elsewhere: batches are copied there) and returned there,
    in fp32 (``precision="bf16"`` autocasts the towers on CUDA; the log-softmax stays fp32). Under torchrun each
    rank computes its contiguous share of the groups and the shares are all-gathered, so every rank must call it
    (every rank runs the same code path) and gets the whole result.
    """
    device = module_device(model)
    ranks = distributed.current()
    was_training = model.training
    model.eval()
    out = [torch.empty((0, data.group_size), device=device)]
    with autocast(device, precision):
        for b in iterate_batches(data, batch_size, rows=ranks.rows(len(data))):
            mask = b.mask.to(device)
            out.append(policy_log_probs(model, *model_inputs(model, b), mask, temperature).float())
    model.train(was_training)
    logp = torch.cat(out)
    return distributed.gather_rows(logp, len(data), ranks) if ranks.world > 1 else logp
