"""The two-tower ranker and the model protocol the stage runners rely on.

Any ``torch.nn.Module`` works in the stage runners if it has

* ``encode_query(query_x: Tensor[B, Dq]) -> Tensor[B, D]``
* ``encode_candidates(cand_x: Tensor[B, G, Dc]) -> Tensor[B, G, D]``

and a constructor accepting ``query_dim=`` and ``cand_dim=`` keyword arguments (plus whatever ``model.kwargs``
holds). Name it in the config as ``model.target: "mypkg.models:MyTwoTower"``. The policy over a group is
``softmax_c(<q, c> / model.sim_temperature)``; a model that L2-normalises its embeddings (cosine similarity)
usually wants a small ``sim_temperature`` such as 0.05.

A model MAY also define ``featurize(batch) -> (query_input, cand_input)`` to build its own inputs from a
:class:`~v3kit.data.Batch` (e.g. tokenised ``batch.query_text`` / ``batch.cand_text``, see
``v3kit.text_model.TextTwoTower``); those are then what ``encode_query`` / ``encode_candidates`` receive.
Without it they receive the feature tensors. Every stage feeds models through :func:`model_inputs`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .data import Batch, GroupData, iterate_batches
from .losses import group_log_probs

DEFAULT_TARGET = "v3kit.model:TwoTower"


@runtime_checkable
class RankerModel(Protocol):
    def encode_query(self, query_x: Tensor) -> Tensor: ...

    def encode_candidates(self, cand_x: Tensor) -> Tensor: ...


@dataclass
class ModelConfig:
    target: str = DEFAULT_TARGET  # "module.path:ClassName"
    hidden: list[int] = field(default_factory=lambda: [64])  # hidden widths of each MLP tower
    emb_dim: int = 32
    normalize: bool = False  # L2-normalise embeddings (cosine similarity)
    sim_temperature: float = 1.0  # divides similarities before the group softmax
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor kwargs for a custom target

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError(f"model.target must look like 'package.module:ClassName', got {self.target!r}")
        if self.sim_temperature <= 0:
            raise ValueError(f"model.sim_temperature must be > 0, got {self.sim_temperature}")
        if self.emb_dim < 1 or any(w < 1 for w in self.hidden):
            raise ValueError(f"model.emb_dim and model.hidden widths must be >= 1, got {self.emb_dim} and "
                             f"{self.hidden}")


def _mlp(in_dim: int, hidden: list[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.GELU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class TwoTower(nn.Module):
    """Query tower and candidate tower, each an MLP, scored by dot product (cosine if ``normalize``)."""

    def __init__(
        self, query_dim: int, cand_dim: int, hidden: list[int] = (64,), emb_dim: int = 32, normalize: bool = False
    ) -> None:
        super().__init__()
        self.query_tower = _mlp(query_dim, list(hidden), emb_dim)
        self.cand_tower = _mlp(cand_dim, list(hidden), emb_dim)
        self.normalize = normalize

    def _out(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x, dim=-1) if self.normalize else x

    def encode_query(self, query_x: Tensor) -> Tensor:
        return self._out(self.query_tower(query_x))

    def encode_candidates(self, cand_x: Tensor) -> Tensor:
        return self._out(self.cand_tower(cand_x))


def import_object(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model.target {target!r}: cannot import module {module_name!r} ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"model.target {target!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_model(cfg: ModelConfig, query_dim: int, cand_dim: int) -> nn.Module:
    """Instantiate ``cfg.target`` and check it follows the ranker protocol."""
    cls = import_object(cfg.target)
    kwargs = dict(cfg.kwargs)
    if cfg.target == DEFAULT_TARGET:
        kwargs.update(hidden=list(cfg.hidden), emb_dim=cfg.emb_dim, normalize=cfg.normalize)
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
    model defines it (e.g. tokenised text), else the feature tensors ``(batch.query_x, batch.cand_x)``."""
    featurize = getattr(model, "featurize", None)
    return (batch.query_x, batch.cand_x) if featurize is None else featurize(batch)


def policy_log_probs(
    model: nn.Module, query_x: Any, cand_x: Any, mask: Tensor, temperature: float
) -> Tensor:
    """Group log-probs ``log pi(c | q)`` of a ranker at a logit temperature (inputs: see :func:`model_inputs`)."""
    return group_log_probs(model.encode_query(query_x), model.encode_candidates(cand_x), temperature, mask)


def scores(model: nn.Module, query_x: Tensor, cand_x: Tensor) -> Tensor:
    """Raw similarities ``<q, c>`` [B, G] (ranking is temperature-free)."""
    return torch.einsum("bd,bgd->bg", model.encode_query(query_x), model.encode_candidates(cand_x))


@torch.inference_mode()
def compute_log_probs(model: nn.Module, data: GroupData, temperature: float, batch_size: int = 1024) -> Tensor:
    """``log pi(c | q)`` for every group of ``data`` ([N, G], ``-inf`` at padding), in eval mode, no autograd."""
    was_training = model.training
    model.eval()
    out = [policy_log_probs(model, *model_inputs(model, b), b.mask, temperature)
           for b in iterate_batches(data, batch_size)]
    model.train(was_training)
    return torch.cat(out)
