"""The two-tower ranker and the model interfaces the stage runners rely on.

Every stage, metric and check reads a model through one number per candidate: its **scores** [B, G]
(:func:`scores`); the policy over a group is ``softmax_c(scores / model.sim_temperature)``. A
``torch.nn.Module`` provides them in one of two ways (``model.interface``, recognised from the class by default):

* **towers**: ``encode_query(query_x: Tensor[B, Dq]) -> Tensor[B, D]`` and
  ``encode_candidates(cand_x: Tensor[B, G, Dc]) -> Tensor[B, G, D]``; the scores are their dot products. Other
  method names are given in ``model.methods`` (``{query: encode_q, candidates: encode_docs}``).
* **scorer**: ``forward(query_x, cand_x) -> Tensor[B, G]`` (or the method ``model.methods.score`` names) returns the
  scores directly: a cross-encoder, a late-interaction model, any ranker whose scores are not a dot product.

The constructor gets ``query_dim=`` / ``cand_dim=`` only if its signature names them, plus whatever
``model.kwargs`` holds (a constructor taking one config dict: ``model.kwargs: {cfg: {...}}``). Name the class in the
config as ``model.target: "mypkg.models:MyTwoTower"`` (importable, the current directory included, as with
``python -m``) or ``model.target: "path/to/models.py:MyTwoTower"`` (a file). A model that L2-normalises its
embeddings (cosine similarity) usually wants a small ``sim_temperature`` such as 0.05.

A model MAY also define ``featurize(batch) -> (query_input, cand_input)`` to build its own inputs from a
:class:`~v3kit.data.Batch` (e.g. tokenised ``batch.query_text`` / ``batch.cand_text``, see
``v3kit.train.text_model.TextTwoTower``); those are then what ``encode_query`` / ``encode_candidates`` receive.
Without it they receive the feature tensors. Every stage feeds models through :func:`model_inputs`.

Raw embeddings (towers only) are needed by nothing in the stages, metrics or checks: they all work on scores.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..bounds import check_all_max, check_max, check_temperature
from ..data.contract import Batch, GroupData, gather_rows, iterate_batches
from ..data.shared_candidates import SharedCandidates
from . import distributed
from .device import autocast, module_device
from .losses import score_log_probs  # noqa: F401 - also v3kit.train.model.score_log_probs, as before
from .model_target import import_object, is_file_target, resolve_target  # noqa: F401 - their old home
from .pretrained import class_target, config_kwargs, from_pretrained, is_pretrained_dir, wants_config

DEFAULT_TARGET = "v3kit.model:TwoTower"
# A layer 1,000,000 wide already holds 4 MB per input unit; wider is a typo (1e12 asked torch for 256 TB). What is
# in bounds but still too big for the machine is refused by the memory check before training (v3kit.bounds).
MAX_WIDTH = 1_000_000
WIDTH_WHY = "wider layers cannot be trained on one machine; is the value a typo?"
INTERFACES = ("auto", "towers", "scorer")
DEFAULT_METHODS = {"query": "encode_query", "candidates": "encode_candidates", "score": "forward"}


@runtime_checkable
class RankerModel(Protocol):
    def encode_query(self, query_x: Tensor) -> Tensor: ...

    def encode_candidates(self, cand_x: Tensor) -> Tensor: ...


RESIDUAL_KINDS = ("mlp", "linear")


@dataclass
class ModelConfig:
    target: str = DEFAULT_TARGET
    """The ranker class: ``package.module:Class`` (importable: installed, on PYTHONPATH or under the current
    directory, as ``python -m`` finds it) or ``path/to/models.py:Class`` (a file, relative to the cwd; checkpoints
    record its absolute path); a function returning the model works too (``pkg.module:make_ranker``). Or a Hugging
    Face ``save_pretrained`` directory, built with ``from_pretrained`` (class from its config.json's ``auto_map`` or
    ``architectures``; docs/your_model.md)."""
    interface: str = "auto"
    """How the class scores a group: ``towers`` (query and candidate embedding methods, scores = their dot
    product), ``scorer`` (one method returns the scores [B, G] of ``(query_input, cand_input)``: cross-encoders,
    any non-dot-product ranker) or ``auto`` (towers when the class has both tower methods, else scorer when it
    defines ``forward``)."""
    methods: dict[str, str] = field(default_factory=dict)
    """Your class's method names where they differ from the defaults: ``query`` (default ``encode_query``),
    ``candidates`` (``encode_candidates``), ``score`` (``forward``, i.e. ``model(query_x, cand_x)``); e.g.
    ``{query: encode_q, candidates: encode_docs}``."""
    hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden widths of each MLP tower; each at most 1,000,000 (``MAX_WIDTH``), at most 1,000 layers."""
    emb_dim: int = 32
    """Embedding dim D of both towers (the default ``TwoTower``); at most 1,000,000 (``MAX_WIDTH``)."""
    normalize: bool = False
    """L2-normalise embeddings (cosine similarity)."""
    sim_temperature: float = 1.0
    """Divides similarities before the group softmax."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor kwargs for a custom target (a constructor taking one config dict: ``{cfg: {...}}``)."""
    disable_dropout: bool = True
    """RCE and GRPO set the model's dropout probabilities to 0 (as TRL's GRPO does), so the old, reference and
    current log-probs are computed the same way (with dropout on, the GRPO ratio is noise even at step 0). SFT keeps
    the model's dropout."""
    residual: bool = False
    """Built-in ``TwoTower`` only: each tower is ``normalize(x + f(x))`` with f an MLP (``hidden``) whose last layer
    starts at zero, so the untrained model *is* the raw-feature cosine ranker and training learns a correction to
    it. Needs query and candidate features of one dim; ``emb_dim`` and ``normalize`` are then unused. Cosine scores
    lie in [-1, 1]: pair it with a small ``sim_temperature`` (e.g. 0.05-0.1) so the policy is not near uniform."""
    residual_kind: str = "mlp"
    """The residual correction f of ``model.residual``: ``mlp`` (an MLP of widths ``hidden``, last layer at zero) or
    ``linear`` (``normalize(x + W x)``, W a square matrix initialised at 0: the smallest correction that can
    re-weight and mix the raw features)."""

    def __post_init__(self) -> None:
        if ":" not in self.target and not is_pretrained_dir(self.target):
            raise ValueError(
                "model.target must look like 'package.module:ClassName' or "
                f"'path/to/models.py:ClassName', or be a save_pretrained directory (with a config.json), "
                f"got {self.target!r}"
            )
        if self.sim_temperature <= 0:
            raise ValueError(f"model.sim_temperature must be > 0, got {self.sim_temperature}")
        check_temperature("model.sim_temperature", self.sim_temperature)
        if self.residual_kind not in RESIDUAL_KINDS:
            raise ValueError(f"model.residual_kind must be one of {RESIDUAL_KINDS}, got {self.residual_kind!r}")
        if self.interface not in INTERFACES:
            raise ValueError(f"model.interface must be one of {INTERFACES}, got {self.interface!r}")
        unknown = sorted(set(self.methods) - set(DEFAULT_METHODS))
        if unknown or not all(isinstance(v, str) and v for v in self.methods.values()):
            raise ValueError(
                f"model.methods maps {sorted(DEFAULT_METHODS)} to method names of your class, e.g. "
                f"{{query: encode_q, candidates: encode_docs}}; got {self.methods!r}"
            )
        if self.emb_dim < 1 or any(w < 1 for w in self.hidden):
            raise ValueError(
                f"model.emb_dim and model.hidden widths must be >= 1, got {self.emb_dim} and {self.hidden}"
            )
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

    def __init__(self, dim: int, hidden: list[int], kind: str = "mlp") -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, dim, bias=False)) if kind == "linear" else _mlp(dim, hidden, dim)
        last = self.f[-1]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x + self.f(x), dim=-1)


class TwoTower(nn.Module):
    """Query tower and candidate tower, each an MLP, scored by dot product (cosine if ``normalize``); with
    ``residual`` each tower is a :class:`ResidualTower` (cosine of the corrected raw features)."""

    def __init__(
        self,
        query_dim: int,
        cand_dim: int,
        hidden: list[int] = (64,),
        emb_dim: int = 32,
        normalize: bool = False,
        residual: bool = False,
        residual_kind: str = "mlp",
    ) -> None:
        super().__init__()
        if residual:
            if query_dim != cand_dim:
                raise ValueError(
                    f"model.residual needs query and candidate features of one dim, got {query_dim} and "
                    f"{cand_dim}; set model.residual=false"
                )
            self.query_tower: nn.Module = ResidualTower(query_dim, list(hidden), residual_kind)
            self.cand_tower: nn.Module = ResidualTower(cand_dim, list(hidden), residual_kind)
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


def constructor_dims(cls: Any, query_dim: int, cand_dim: int) -> dict[str, int]:
    """``query_dim`` / ``cand_dim`` for the constructor parameters of ``cls`` that are named so (a constructor that
    takes, say, one config dict gets neither); both when the signature cannot be read."""
    dims = {"query_dim": query_dim, "cand_dim": cand_dim}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dims
    return {
        k: v
        for k, v in dims.items()
        if k in params and params[k].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
    }


@dataclass(frozen=True)
class Interface:
    """How :func:`scores` reads a model: ``kind`` ``towers`` (methods ``query`` / ``candidates``) or ``scorer``
    (method ``score``; ``forward`` means calling the module)."""

    kind: str
    query: str = DEFAULT_METHODS["query"]
    candidates: str = DEFAULT_METHODS["candidates"]
    score: str = DEFAULT_METHODS["score"]


INTERFACE_ATTR = "_v3kit_interface"  # set on every model build_model makes; deep copies keep it


def _has_score_method(model: nn.Module, name: str) -> bool:
    if name == "forward":
        return type(model).forward is not nn.Module.forward
    return callable(getattr(model, name, None))


def resolve_interface(
    model: nn.Module, interface: str = "auto", methods: dict[str, str] | None = None, target: str | None = None
) -> Interface:
    """The :class:`Interface` of ``model`` under ``model.interface`` / ``model.methods``; a ``TypeError`` naming
    what is missing when the model has neither two tower methods nor a scoring method."""
    names = {**DEFAULT_METHODS, **(methods or {})}
    towers = Interface("towers", names["query"], names["candidates"], names["score"])
    scorer = Interface("scorer", names["query"], names["candidates"], names["score"])
    has_towers = all(callable(getattr(model, names[k], None)) for k in ("query", "candidates"))
    has_score = _has_score_method(model, names["score"])
    what = f"model.target {target!r}" if target else type(model).__name__
    if interface == "towers" or (interface == "auto" and has_towers):
        if not has_towers:
            missing = [names[k] for k in ("query", "candidates") if not callable(getattr(model, names[k], None))]
            raise TypeError(
                f"{what} ({type(model).__name__}) has no method(s) {missing} for model.interface: "
                "towers; name its tower methods with model.methods {query: ..., candidates: ...}"
            )
        return towers
    if interface == "scorer" or has_score:
        if not has_score:
            raise TypeError(
                f"{what} ({type(model).__name__}) has no scoring method {names['score']!r} for "
                "model.interface: scorer; name it with model.methods {score: ...}"
            )
        return scorer
    raise TypeError(
        f"{what} built a {type(model).__name__}, which is not an nn.Module with tower methods "
        f"({names['query']}, {names['candidates']}) or a forward(query_x, cand_x) returning scores [B, G]; name "
        "your methods with model.methods (e.g. {query: encode_q, candidates: encode_docs} or {score: score})"
    )


def interface_of(model: nn.Module) -> Interface:
    """The interface :func:`build_model` recorded on ``model``, else the one its class shows (default names)."""
    found = getattr(model, INTERFACE_ATTR, None)
    return found if isinstance(found, Interface) else resolve_interface(model)


def attach_interface(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Record on ``model`` how :func:`scores` reads it under ``cfg.interface`` / ``cfg.methods`` (a model built
    elsewhere and handed to a stage runner); returns ``model``."""
    object.__setattr__(model, INTERFACE_ATTR, resolve_interface(model, cfg.interface, cfg.methods, cfg.target))
    return model


def _takes(cls: Any, name: str) -> bool:
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _constructor_kwargs(cfg: ModelConfig, cls: Any) -> dict[str, Any]:
    """``model.kwargs`` plus what the model section gives the built-in ``TwoTower`` (and ``residual`` /
    ``normalize`` to any class whose constructor names them), a ``config`` dict turned into a PretrainedConfig."""
    kwargs = dict(cfg.kwargs)
    if cfg.target == DEFAULT_TARGET:
        kwargs.update(hidden=list(cfg.hidden), emb_dim=cfg.emb_dim, normalize=cfg.normalize)
        if cfg.residual:  # only when set: checkpoints of earlier versions rebuild with the same arguments
            kwargs["residual"] = True
            if cfg.residual_kind != "mlp":
                kwargs["residual_kind"] = cfg.residual_kind
    elif cfg.residual:
        if not _takes(cls, "residual"):
            raise ValueError(
                f"model.residual applies to the built-in {DEFAULT_TARGET} and to classes whose constructor takes "
                f"residual (v3kit.text_model:SentenceTransformerRanker), not {cfg.target!r}; build the residual "
                "into your own towers, or set model.residual=false"
            )
        kwargs.setdefault("residual", True)
        if _takes(cls, "hidden"):
            kwargs.setdefault("hidden", list(cfg.hidden))
    if cfg.normalize and cfg.target != DEFAULT_TARGET and _takes(cls, "normalize"):
        kwargs.setdefault("normalize", True)
    return config_kwargs(cls, kwargs)


def _build_error(cfg: ModelConfig, cls: Any, dims: dict[str, int], error: Exception) -> str:
    """Why ``cls`` could not be built, with an example ``--kwargs`` naming its constructor's own parameters."""
    name = getattr(cls, "__name__", str(cls))
    try:
        params = inspect.signature(cls).parameters
        sig = f"{name}{inspect.signature(cls)}"
    except (TypeError, ValueError):
        params, sig = {}, str(cls)
    plain = [
        p
        for p in params.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("query_dim", "cand_dim")
    ]
    wanted = [p.name for p in plain if p.default is p.empty] or [p.name for p in plain][:1]
    example = "{" + ", ".join(f'"{n}": ...' for n in wanted) + "}" if wanted else None
    how = f"e.g. '{example}'" if example else "or pick another target"
    hint = f"pass its arguments with --kwargs / model.kwargs, {how}"
    if wants_config(cls):
        hint += (
            f" (config: the contents of the config.json that {name}.save_pretrained wrote, or import the "
            "save_pretrained directory itself: v3kit import-sft --from-pretrained DIR)"
        )
    what = "constructor" if inspect.isclass(cls) else "signature"
    return (
        f"model.target {cfg.target!r} could not be built with {', '.join(dims) or 'no feature dims'}"
        f" and model.kwargs={cfg.kwargs} ({error}); its {what} is {sig}: {hint}"
    )


def build_model(cfg: ModelConfig, query_dim: int, cand_dim: int) -> nn.Module:
    """Instantiate ``cfg.target`` and check it is a ranker (towers or scorer, :func:`resolve_interface`).

    ``cfg.target`` names a class or a function returning the model (called with ``model.kwargs``, plus the dims
    it names), or a ``save_pretrained`` directory (built with ``from_pretrained``, :mod:`v3kit.train.pretrained`).
    """
    if ":" not in cfg.target and is_pretrained_dir(cfg.target):
        if cfg.residual:
            raise ValueError(
                f"model.residual does not apply to the save_pretrained directory {cfg.target!r}; set model.residual=false"
            )
        target, _ = class_target(cfg.target)
        model = from_pretrained(import_object(target), cfg.target, cfg.target)
    else:
        cls = import_object(cfg.target)
        kwargs = _constructor_kwargs(cfg, cls)
        dims = {k: v for k, v in constructor_dims(cls, query_dim, cand_dim).items() if k not in kwargs}
        try:
            model = cls(**dims, **kwargs)
        except TypeError as e:  # a wrong keyword in model.kwargs, or a constructor that wants other arguments
            raise ValueError(_build_error(cfg, cls, dims, e)) from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.target {cfg.target!r} built a {type(model).__name__}, which is not an nn.Module")
    attach_interface(model, cfg)
    if min(query_dim, cand_dim) == 0 and getattr(model, "featurize", None) is None:
        raise ValueError(
            f"the data has no feature vectors (text only, data.text_mode: end_to_end) but model.target "
            f"{cfg.target!r} reads features; use model.target: v3kit.text_model:TextTwoTower or "
            "data.text_mode: frozen"
        )
    return model


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0, as TRL's GRPO does; returns how many were changed.

    Covers ``nn.Dropout*`` modules and float attributes whose name contains ``dropout`` (``nn.MultiheadAttention``'s
    ``dropout``, Hugging Face attention's ``dropout_prob`` / ``attention_dropout``, read at call time). A dropout
    called as a function with a literal ``p`` is not seen."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if m.p != 0:
                m.p, changed = 0.0, changed + 1
            continue
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float) and 0 < value < 1:
                setattr(m, name, 0.0)
                changed += 1
    return changed


def model_inputs(model: nn.Module, batch: Batch) -> tuple[Any, Any]:
    """What ``model.encode_query`` / ``encode_candidates`` take for ``batch``: ``model.featurize(batch)`` when the
    model defines it (e.g. tokenised text), else the feature tensors ``(batch.query_x, batch.cand_x)``; on the
    model's device."""
    featurize = getattr(model, "featurize", None)
    if featurize is not None:
        inputs = featurize(batch)
    elif batch.shared is not None and reads_shared(model, batch.shared.any_model):
        inputs = (batch.query_x, batch.shared)
    else:
        inputs = (batch.query_x, batch.cand_x)
    device = module_device(model)  # a batch (or a featurizer's tokens) may live elsewhere, e.g. on the CPU
    return tuple(x.to(device) if hasattr(x, "to") else x for x in inputs)  # type: ignore[return-value]


def reads_shared(model: nn.Module, any_model: bool) -> bool:
    """Whether ``model`` embeds a batch's candidates as rows of a shared table (:class:`SharedCandidates`): a towers
    model without ``featurize``; the built-in :class:`TwoTower` only unless the run says ``candidate_table: true``
    (another model's candidate tower might mix the candidates of a group, which the table would not see)."""
    if getattr(model, "featurize", None) is not None or interface_of(model).kind != "towers":
        return False
    if distributed.current().world > 1:  # torchrun splits a batch's groups across ranks, not a table's rows
        return False
    return any_model or type(model) is TwoTower


def scores(model: nn.Module, query_x: Any, cand_x: Any) -> Tensor:
    """The model's scores [B, G] of each group's candidates (inputs: see :func:`model_inputs`): the dot products
    of the two towers, or a scorer's own output. Ranking is temperature-free; the policy divides them by it.
    ``cand_x`` may be :class:`SharedCandidates`: the candidate tower then embeds each distinct candidate once."""
    spec = interface_of(model)
    if spec.kind == "towers":
        q = getattr(model, spec.query)(query_x)
        if isinstance(cand_x, SharedCandidates):
            table = getattr(model, spec.candidates)(cand_x.features.unsqueeze(0))  # a towers model takes [B, G, Dc]
            c = gather_rows(table[0], cand_x.rows)
        else:
            c = getattr(model, spec.candidates)(cand_x)
        if q.dim() != 2 or c.dim() != 3 or q.shape[0] != c.shape[0] or q.shape[1] != c.shape[2]:
            raise ValueError(
                f"{type(model).__name__}.{spec.query} gave {tuple(q.shape)} and {spec.candidates} "
                f"{tuple(c.shape)}; towers must give [B, D] and [B, G, D] with the same D"
            )
        return torch.einsum("bd,bgd->bg", q, c)
    fn = model if spec.score == "forward" else getattr(model, spec.score)
    out = fn(query_x, cand_x.dense() if isinstance(cand_x, SharedCandidates) else cand_x)
    shape = _group_shape(cand_x)
    if not isinstance(out, Tensor) or out.dim() != 2 or (shape is not None and tuple(out.shape) != shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{type(model).__name__}.{spec.score}(query_x, cand_x) gave {got}; a scorer returns one "
            f"score per candidate, [B, G]{f' = {list(shape)}' if shape else ''}"
        )
    return out


def _group_shape(cand_x: Any) -> tuple[int, int] | None:
    return tuple(cand_x.shape[:2]) if isinstance(cand_x, Tensor) and cand_x.dim() >= 2 else None


def policy_log_probs(model: nn.Module, query_x: Any, cand_x: Any, mask: Tensor, temperature: float) -> Tensor:
    """Group log-probs ``log pi(c | q)`` of a ranker at a logit temperature (inputs: see :func:`model_inputs`)."""
    return score_log_probs(scores(model, query_x, cand_x), temperature, mask)


@torch.inference_mode()
def compute_log_probs(
    model: nn.Module, data: GroupData, temperature: float, batch_size: int = 1024, *, precision: str = "fp32"
) -> Tensor:
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
