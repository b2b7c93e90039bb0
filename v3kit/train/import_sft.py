"""``v3kit import-sft``: turn a plain PyTorch ``state_dict`` of your own ranker into a v3kit SFT checkpoint.

Your v2 training code saved ``torch.save(model.state_dict(), "v2.pt")`` (maybe wrapped as ``{"model": sd}`` or
``{"state_dict": sd, "epoch": ...}``, maybe with DDP's ``module.`` prefix). v3kit checkpoints also record how to
rebuild the model (``model_config``) and the feature dims, which a bare state dict lacks. This module builds your
class through :func:`v3kit.train.model.build_model`, loads the weights into it with every mismatch reported at once,
and writes ``sft.pt`` in the same shape :func:`v3kit.train.sft.train_sft` does, so ``v3kit run --sft`` and notebook 01's
``sft_checkpoint`` accept it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..bounds import MAX_CONFIG_FLOAT, MIN_TEMPERATURE, cli_number
from ..data.contract import Batch, GroupData
from ..data.text import PACKAGED_ENCODERS
from .checkpoint import (
    CheckpointError,
    check_finite_weights,
    load_checkpoint,
    model_from_checkpoint,
    model_payload,
    save_checkpoint,
)
from .model import (
    INTERFACES,
    MAX_WIDTH,
    ModelConfig,
    build_model,
    compute_log_probs,
    import_object,
    interface_of,
    model_inputs,
    scores,
)
from .pretrained import ST_MODULES_FILE, from_pretrained, is_pretrained_dir

__all__ = [
    "StateDictMismatch",
    "import_sft",
    "import_pretrained",
    "import_sentence_transformers",
    "read_state_dict",
    "unwrap_state_dict",
    "apply_renames",
    "fit_report",
    "register_cli",
]

# Keys under which training scripts commonly nest the weights, tried in this order (Lightning, HF Trainer-style
# dicts, hand-written {"model": sd, "optimizer": ..., "epoch": ...}).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes every key gets from a wrapper module: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class StateDictMismatch(CheckpointError):
    """The state dict does not fit the model: ``missing``, ``unexpected`` and ``mismatched`` list every key."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj][:8]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def read_state_dict(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary pickled code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"--state-dict {path} is a directory, not a weights file; {directory_hint(path)}")
    if not path.is_file():
        raise CheckpointError(f"state dict file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for foreign files
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"{path} holds pickled Python objects (e.g. a whole model saved with torch.save(model)), not just "
                "tensors; save the weights instead: torch.save(model.state_dict(), 'v2.pt')"
            ) from None
        first = text.splitlines()[0][:120] if text else ""
        raise CheckpointError(
            f"{path} is not a PyTorch file torch.load can read ({type(e).__name__}: {first}); "
            "point --state-dict at the file your training saved with torch.save(model.state_dict(), ...)"
        ) from None


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def directory_hint(path: Path) -> str:
    """What to pass for a directory given where a weights file was expected."""
    if (path / ST_MODULES_FILE).is_file():
        return f"it is a sentence-transformers model: import it with --sentence-transformers {path}"
    if is_pretrained_dir(path):
        return (
            f"it is a save_pretrained directory: import it with --from-pretrained {path} (the class from its "
            "config.json, or --target pkg.module:Class)"
        )
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if files:
        return f"pass the weights file inside it, e.g. --state-dict {path / files[0]} (it holds {files[:6]})"
    return "pass the file your training saved with torch.save(model.state_dict(), ...) or safetensors' save_file"


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items()}


def unwrap_state_dict(
    obj: Any, *, key: str | None = None, model_keys: Sequence[str] = (), source: str | Path = "<state dict>"
) -> dict[str, Tensor]:
    """The flat ``{name: tensor}`` inside ``obj``.

    ``key`` picks a nested entry (``"ema"``, or a dotted path ``"checkpoint.model"``), or, when no such entry exists,
    the keys of a flat dict that start with ``key + "."`` (prefix stripped). Without ``key``, wrappers in
    :data:`WRAPPER_KEYS` are unwrapped. Then a prefix in :data:`WRAPPER_PREFIXES` shared by every key is stripped
    unless the model's own keys (``model_keys``) carry it too.
    """
    if key:
        obj = _select(obj, key, source)
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{source} holds {_describe(obj)}, not a state dict of tensors; save model.state_dict() instead"
            )
        inner = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(
                f"{source} holds {_describe(obj)}, which is not a state dict of tensors and has none of the usual "
                f"wrapper keys {list(WRAPPER_KEYS)}; name the entry that holds the weights with --key"
            )
        obj = obj[inner]
    state = dict(obj)
    own_prefixed = bool(model_keys)
    for prefix in WRAPPER_PREFIXES:
        while all(k.startswith(prefix) for k in state) and not (
            own_prefixed and all(k.startswith(prefix) for k in model_keys)
        ):
            state = _strip_prefix(state, prefix)
    return state


def _select(obj: Any, key: str, source: str | Path) -> Any:
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    node = obj
    for part in key.split("."):
        if not (isinstance(node, Mapping) and part in node):
            break
        node = node[part]
    else:
        return node
    # A prefix of a flat state dict: {"model.encoder.weight": ...} with --key model.
    if _is_state_dict(obj):
        picked = {k[len(key) + 1 :]: v for k, v in obj.items() if k.startswith(key + ".")}
        if picked:
            return picked
    raise CheckpointError(f"--key {key!r}: {source} has no such entry or key prefix (it holds {_describe(obj)})")


def apply_renames(state: dict[str, Tensor], renames: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
    """Rename key prefixes in order: ``(old, new)`` turns ``old`` and ``old.*`` into ``new`` and ``new.*``.

    A rename that matches no key is an error (a typo would otherwise surface as a confusing missing-key report).
    """
    for old, new in renames:
        out: dict[str, Tensor] = {}
        hit = False
        for k, v in state.items():
            if k == old or k.startswith(old + "."):
                k, hit = new + k[len(old) :], True
            if k in out:
                raise CheckpointError(f"--rename {old}={new} makes two tensors named {k!r}; rename more narrowly")
            out[k] = v
        if not hit:
            tops = sorted({k.split(".")[0] for k in state})
            raise CheckpointError(
                f"--rename {old}={new}: no key is {old!r} or starts with {old + '.'!r} (the top-level names are {tops})"
            )
        state = out
    return state


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


def _probe_scores(model: nn.Module, batch: Batch) -> Tensor:
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
        out = _probe_scores(model, probe_batch(query_dim, cand_dim))
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
    before = _probe_scores(model, batch)
    raw = _swap(model, attr, 0.0)
    changed = float(raw) + math.log(2.0) if form == "log_scale" else float(raw) * 2.0
    _swap(model, attr, changed)
    try:
        after = _probe_scores(model, batch)
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


def import_sft(
    target: str,
    state_dict: str | Path,
    out: str | Path,
    *,
    query_dim: int,
    cand_dim: int,
    kwargs: Mapping[str, Any] | None = None,
    key: str | None = None,
    renames: Sequence[tuple[str, str]] = (),
    sim_temperature: float | None = None,
    temperature_attr: str | None = None,
    temperature_form: str = "temperature",
    interface: str | None = None,
    methods: Mapping[str, str] | None = None,
    model_config: ModelConfig | None = None,
) -> Path:
    """Write a v3kit SFT checkpoint at ``out`` from the plain state dict file ``state_dict`` of class ``target``.

    ``target`` is ``pkg.module:Class`` or ``path/to/models.py:Class``; the class is built with ``kwargs`` (and
    ``query_dim`` / ``cand_dim`` when its constructor names them). ``interface`` / ``methods`` are
    ``model.interface`` / ``model.methods`` (towers under other names, or a scorer). ``model_config`` supplies the
    other model fields (``hidden``/``emb_dim``/``normalize`` for v3kit's own ``TwoTower``); ``sim_temperature``
    overrides its logit temperature, or ``temperature_attr`` reads it from the loaded model
    (:func:`read_temperature`). Nothing is written unless every tensor fits. Returns ``out``.
    """
    base = model_config or ModelConfig()
    changes = _model_changes(sim_temperature, interface, methods, temperature_attr)
    changes.update(target=target, kwargs=dict(kwargs if kwargs is not None else base.kwargs))
    cfg = dataclasses.replace(base, **changes)  # re-runs ModelConfig's validation
    _check_dims(query_dim, cand_dim)
    raw = read_state_dict(state_dict)  # first: a directory or a foreign file is named before any build error
    model = _build(cfg, query_dim, cand_dim)
    state = unwrap_state_dict(raw, key=key, model_keys=list(model.state_dict()), source=state_dict)
    state = apply_renames(state, renames)
    fit_report(model, state, state_dict, target)
    check_finite_weights(
        state,
        state_dict,
        {k for k, _ in model.named_parameters()},
        "nothing was written; export the weights of a model that trained without NaN/inf",
    )
    model.load_state_dict(state)
    provenance = {"path": str(Path(state_dict).resolve()), "key": key, "renames": [list(r) for r in renames]}
    return _write_import(model, cfg, out, query_dim, cand_dim, target, provenance, temperature_attr, temperature_form)


def temperature_twice_message(attr: str, model: nn.Module) -> str:
    return (
        f"--temperature-attr {attr}: {type(model).__name__}'s scores already use {attr} (they change when it "
        "changes), so dividing by it again would apply it twice; either drop --temperature-attr (sim_temperature "
        "stays 1, your scores already hold it) or score through methods that leave it out (--methods / "
        "--interface towers) and keep --temperature-attr; nothing was written"
    )


def _write_import(
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


def _model_changes(
    sim_temperature: float | None,
    interface: str | None,
    methods: Mapping[str, str] | None,
    temperature_attr: str | None,
) -> dict[str, Any]:
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


def _build(cfg: ModelConfig, query_dim: int, cand_dim: int) -> nn.Module:
    try:
        return build_model(cfg, query_dim, cand_dim)
    except TypeError as e:  # not a ranker: a one-line message, not a traceback
        raise ValueError(str(e)) from None


def _check_dims(query_dim: int, cand_dim: int, allow_zero: bool = False) -> None:
    for name, dim in (("query_dim", query_dim), ("cand_dim", cand_dim)):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < (0 if allow_zero else 1):
            raise ValueError(f"{name} must be a positive integer, got {dim!r}")


def import_pretrained(
    directory: str | Path,
    out: str | Path,
    *,
    query_dim: int,
    cand_dim: int,
    target: str | None = None,
    sim_temperature: float | None = None,
    temperature_attr: str | None = None,
    temperature_form: str = "temperature",
    interface: str | None = None,
    methods: Mapping[str, str] | None = None,
    model_config: ModelConfig | None = None,
) -> Path:
    """Write a v3kit SFT checkpoint at ``out`` from a Hugging Face ``save_pretrained`` directory.

    Without ``target`` the class comes from the directory's config.json (``auto_map``, ``architectures``) and the
    checkpoint records the directory as ``model.target`` (rebuilt with ``from_pretrained``). With ``target``
    (``pkg.module:Class``) the model is ``Class.from_pretrained(directory)`` and the checkpoint records the class and
    its config (``model.kwargs.config``), so it rebuilds without the directory. Returns ``out``.
    """
    directory = Path(directory).expanduser()
    if (directory / ST_MODULES_FILE).is_file() and target is None:
        raise ValueError(
            f"--from-pretrained {directory}: it is a sentence-transformers model (it has {ST_MODULES_FILE}); "
            f"import it with --sentence-transformers {directory}"
        )
    if not is_pretrained_dir(directory):
        what = "a file" if directory.is_file() else "not a directory" if not directory.exists() else "a directory"
        raise ValueError(
            f"--from-pretrained {directory} is {what} without a config.json; pass the directory "
            "model.save_pretrained(DIR) wrote (a weights file goes to --state-dict, with --target)"
        )
    base = model_config or ModelConfig()
    changes = _model_changes(sim_temperature, interface, methods, temperature_attr)
    _check_dims(query_dim, cand_dim)
    if target is None:
        cfg = dataclasses.replace(base, target=str(directory.resolve()), kwargs={}, **changes)
        model = _build(cfg, query_dim, cand_dim)
        shown = str(directory)
    else:
        loaded = from_pretrained(import_object(target), directory, target)
        config = json.loads(loaded.config.to_json_string(use_diff=False))
        cfg = dataclasses.replace(base, target=target, kwargs={"config": config}, **changes)
        model = _build(cfg, query_dim, cand_dim)  # exactly as a checkpoint rebuilds it
        state = loaded.state_dict()
        fit_report(model, state, directory, target)
        model.load_state_dict(state)
        shown = target
    provenance = {"from_pretrained": str(directory.resolve())}
    return _write_import(model, cfg, out, query_dim, cand_dim, shown, provenance, temperature_attr, temperature_form)


ST_TARGET = "v3kit.text_model:SentenceTransformerRanker"
COSINE_TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scales cosines by 20


def import_sentence_transformers(
    directory: str | Path,
    out: str | Path,
    *,
    towers: str = "shared",
    train_layers: int = 1,
    max_tokens: int | None = None,
    sim_temperature: float | None = None,
    model_config: ModelConfig | None = None,
) -> Path:
    """Write a v3kit SFT checkpoint at ``out`` whose policy is the sentence-transformers model ``directory`` (a
    ``.save()`` directory, or the packaged ``all-MiniLM-L6-v2``), as
    :class:`~v3kit.train.text_model.SentenceTransformerRanker` (``towers``, ``train_layers``: -1 = end to end).

    The checkpoint records the directory (its frozen layers are read from it) and the trainable tensors. The policy
    temperature is ``sim_temperature``, else the config's ``model.sim_temperature`` when set, else 0.05 for a
    cosine model (the scale 20 of sentence-transformers' ranking loss) and 1 for a dot-product one.
    """
    name = str(directory)
    if name not in PACKAGED_ENCODERS:
        path = Path(directory).expanduser()
        if not (path / ST_MODULES_FILE).is_file():
            hint = (
                f"it is a transformers save_pretrained directory: use --from-pretrained {path}"
                if is_pretrained_dir(path)
                else "pass the directory SentenceTransformer.save(DIR) wrote"
            )
            raise ValueError(f"--sentence-transformers {path} has no {ST_MODULES_FILE}; {hint}")
        name = str(path.resolve())
    base = model_config or ModelConfig()
    kwargs = {"path": name, "towers": towers, "train_layers": train_layers, "max_tokens": max_tokens}
    if base.normalize:
        kwargs["normalize"] = True
    cfg = dataclasses.replace(base, target=ST_TARGET, kwargs=kwargs, interface="towers", methods={})
    model = _build(cfg, 0, 0)
    if sim_temperature is None:
        cosine = bool(getattr(model, "normalize", False)) or cfg.residual
        default = ModelConfig().sim_temperature
        sim_temperature = (
            base.sim_temperature if base.sim_temperature != default else COSINE_TEMPERATURE if cosine else default
        )
    cfg = dataclasses.replace(cfg, sim_temperature=float(sim_temperature))
    provenance = {"sentence_transformers": name}
    return _write_import(model, cfg, out, 0, 0, ST_TARGET, provenance)


# ---------------------------------------------------------------------------------------------------------- CLI


def _parse_rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep or not old or not new:
        raise ValueError(f"--rename {text!r} must look like OLD=NEW, e.g. --rename query_net=query_encoder")
    return old, new


def _json_object(flag: str, text: str | None, example: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e}); e.g. {flag} '{example}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. {flag} '{example}', got {text!r}")
    return value


def next_run_command(out: str | Path, args: argparse.Namespace) -> str:
    """The ``v3kit run`` command that trains from the written checkpoint on the same data, quoted for a shell."""
    cmd = ["v3kit", "run", "--sft", str(out)]
    if args.config is not None:
        cmd += ["--config", str(args.config)]
    for item in args.set or []:
        cmd += ["--set", item]
    return shlex.join(cmd)


def _feature_dims(args: argparse.Namespace) -> tuple[int | None, int | None, GroupData | None, ModelConfig | None]:
    query_dim, cand_dim, model_cfg, data = args.query_dim, args.cand_dim, None, None
    if args.config is not None or args.set:
        data, model_cfg = args.data_from_config(args)  # the run floor's: see register_cli
        q, c = data.query_dim, data.cand_dim
        for flag, given, found in (("--query-dim", query_dim, q), ("--cand-dim", cand_dim, c)):
            if given is not None and given != found:
                raise ValueError(f"{flag} {given} disagrees with the data of the config ({found}); drop {flag}")
        query_dim, cand_dim = q, c
    return query_dim, cand_dim, data, model_cfg


def _import_from_args(args: argparse.Namespace) -> tuple[Path, str, str, GroupData | None]:
    """Run the import the flags ask for; ``(checkpoint, what was imported, where the weights came from, data)``."""
    query_dim, cand_dim, data, model_cfg = _feature_dims(args)
    temperature = {
        "sim_temperature": args.sim_temperature,
        "temperature_attr": args.temperature_attr,
        "temperature_form": args.temperature_form,
    }
    if args.sentence_transformers is not None:
        if data is not None and data.query_text is None:
            raise ValueError(
                "--sentence-transformers reads text, and the config's data has none to read: a table with "
                "query_text / candidate_text columns and --set data.text_mode=end_to_end"
            )
        if args.temperature_attr is not None:
            raise ValueError("--temperature-attr does not apply to --sentence-transformers; use --sim-temperature")
        path = import_sentence_transformers(
            args.sentence_transformers,
            args.out,
            towers=args.towers,
            train_layers=args.train_layers,
            max_tokens=args.max_tokens,
            sim_temperature=args.sim_temperature,
            model_config=model_cfg,
        )
        return path, ST_TARGET, str(args.sentence_transformers), data
    if query_dim is None or cand_dim is None:
        raise ValueError(
            "the feature dims are unknown: pass --query-dim and --cand-dim, or --config (and --set) "
            "of the run so they are read from its data"
        )
    methods = _json_object("--methods", args.methods, '{"query": "encode_q", "candidates": "encode_docs"}')
    common = dict(query_dim=query_dim, cand_dim=cand_dim, interface=args.interface, methods=methods, **temperature)
    if args.from_pretrained is not None:
        if args.kwargs is not None:
            raise ValueError("--kwargs does not apply to --from-pretrained: the directory's config.json holds them")
        path = import_pretrained(args.from_pretrained, args.out, target=args.target, model_config=model_cfg, **common)
        return path, args.target or str(args.from_pretrained), str(args.from_pretrained), data
    if args.target is None:
        raise ValueError("--state-dict needs --target pkg.module:Class (the class the weights belong to)")
    path = import_sft(
        args.target,
        args.state_dict,
        args.out,
        kwargs=_json_object("--kwargs", args.kwargs, '{"dim": 32}'),
        key=args.key,
        renames=[_parse_rename(r) for r in args.rename or []],
        model_config=model_cfg,
        **common,
    )
    return path, args.target, str(args.state_dict), data


def _how(ckpt: dict[str, Any], model: nn.Module) -> str:
    """How the interface was chosen: named, or recognised from the class (a factory's: from what it built)."""
    kind = ckpt["model_config"]["interface"]
    how = f"interface {interface_of(model).kind}"
    if kind != "auto":
        return how
    target = ckpt["model_config"]["target"]
    if ":" not in target:
        return f"{how}, recognised from {type(model).__name__}, the class config.json names"
    built_by = import_object(target)
    if isinstance(built_by, type):
        return f"{how}, recognised from the class"
    return f"{how}, recognised from the {type(model).__name__} that {target.rpartition(':')[2]} built"


def cmd_import_sft(args: argparse.Namespace) -> int:
    path, what, source, data = _import_from_args(args)
    ckpt = load_checkpoint(path)
    t = ckpt["model_config"]["sim_temperature"]
    model = model_from_checkpoint(ckpt, path)
    print(
        f"wrote {path}: {what} ({_how(ckpt, model)}) with the weights of {source} (query_dim {ckpt['query_dim']}, "
        f"cand_dim {ckpt['cand_dim']}, sim_temperature {t:g}"
        f"{f' read from {args.temperature_attr}' if args.temperature_attr else ''})"
    )
    if data is not None:
        share = entropy_share(model, data, t)
        print(
            f"imported policy on the data: mean entropy {share:.0%} of log G (100% = uniform) at sim_temperature {t:g}"
        )
        if share > NEAR_UNIFORM:
            print(
                "warning: the imported policy is nearly uniform over each group: if your model divides its scores "
                "by a temperature (or multiplies by a logit scale), set --sim-temperature T or --temperature-attr "
                "NAME, else RCE and GRPO start from a policy much flatter than your model's"
            )
    print(f"next: {next_run_command(path, args)}")
    return 0


def register_cli(
    subparsers: Any, data_from_config: Callable[[argparse.Namespace], tuple[GroupData, ModelConfig]]
) -> None:
    """``v3kit import-sft``: a plain state dict of your own class -> a v3kit ``sft.pt``. ``data_from_config``: the
    data and model section of the run config that ``--config`` / ``--set`` name (the run config and its data are
    the run floor's, above this one, so the command line passes the function in)."""
    p = subparsers.add_parser(
        "import-sft",
        help="make a v3kit SFT checkpoint from your own model: a state_dict file, a Hugging Face save_pretrained "
        "directory or a sentence-transformers model",
    )
    p.add_argument(
        "--target",
        metavar="MODULE:CLASS",
        help="your ranker: pkg.module:Class (importable from the current directory or PYTHONPATH), "
        "path/to/models.py:Class, or a function returning the model (pkg.module:make_ranker); with "
        "--from-pretrained, the PreTrainedModel class when config.json's auto_map/architectures do not locate it",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--state-dict",
        metavar="FILE",
        help="torch.save(model.state_dict()) output, or a .safetensors file (with --target)",
    )
    source.add_argument(
        "--from-pretrained",
        metavar="DIR",
        help="a Hugging Face model.save_pretrained(DIR) directory (config.json + model.safetensors)",
    )
    source.add_argument(
        "--sentence-transformers",
        metavar="DIR",
        help="a sentence-transformers model directory (SentenceTransformer.save(DIR)) as the policy; text data "
        "(data.text_mode: end_to_end)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the v3kit SFT checkpoint to write (e.g. sft.pt)")
    dim = cli_number(int, 1, MAX_WIDTH)
    p.add_argument("--query-dim", type=dim, help="query feature dim (or read it from the data with --config)")
    p.add_argument("--cand-dim", type=dim, help="candidate feature dim (or read it from the data with --config)")
    p.add_argument("--config", help="run config whose data gives the feature dims (and model defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, as for `run`")
    p.add_argument("--kwargs", metavar="JSON", help="extra constructor arguments, e.g. '{\"dim\": 32}'")
    p.add_argument("--key", help="entry (or key prefix) that holds the weights, e.g. ema or model.backbone")
    p.add_argument("--rename", action="append", metavar="OLD=NEW", help="rename a key prefix (repeatable)")
    p.add_argument(
        "--sim-temperature",
        type=cli_number(float, MIN_TEMPERATURE, MAX_CONFIG_FLOAT),
        help="model.sim_temperature of the policy (default 1.0; with --sentence-transformers, 0.05 for a cosine model)",
    )
    p.add_argument(
        "--temperature-attr",
        metavar="NAME",
        help="read model.sim_temperature from this attribute, buffer or parameter of your model "
        "(e.g. temperature, logit_scale; see --temperature-form). Use it only when the scores v3kit reads leave "
        "the temperature out (towers, or --methods naming a method that does not divide by it); when your "
        "forward already divides by it, leave it out (it would apply twice: refused)",
    )
    p.add_argument(
        "--temperature-form",
        choices=TEMPERATURE_FORMS,
        default="temperature",
        help="what --temperature-attr holds: temperature (scores / T), scale (scores * s) or log_scale "
        "(scores * exp(s), CLIP's logit_scale)",
    )
    p.add_argument(
        "--interface",
        choices=INTERFACES,
        help="model.interface: towers (two embedding methods) | scorer (forward(query_x, cand_x) -> "
        "scores [B, G]) | auto (default: recognised from the class)",
    )
    p.add_argument(
        "--methods",
        metavar="JSON",
        help='model.methods: your method names, e.g. \'{"query": "encode_q", "candidates": '
        '"encode_docs"}\' or \'{"score": "score"}\'',
    )
    _add_sentence_transformers_args(p)
    p.set_defaults(func=cmd_import_sft, data_from_config=data_from_config)


def _add_sentence_transformers_args(p: Any) -> None:
    """The options that apply with ``--sentence-transformers``."""
    st = p.add_argument_group("with --sentence-transformers")
    st.add_argument(
        "--towers",
        choices=("shared", "two"),
        default="shared",
        help="one encoder for queries and candidates (shared, as sentence-transformers trains) or a copy each (two)",
    )
    st.add_argument(
        "--train-layers",
        type=cli_number(int, -1, 100_000),
        default=1,
        metavar="N",
        help="train the top N transformer layers (and any dense layer after them), freeze the rest; -1 trains "
        "the whole model end to end (default 1)",
    )
    st.add_argument(
        "--max-tokens",
        type=cli_number(int, 1, 100_000),
        metavar="N",
        help="truncate texts at N tokens (default: the model's)",
    )
