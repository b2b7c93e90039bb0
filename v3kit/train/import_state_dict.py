"""The plain state-dict import: your v2 training code saved ``torch.save(model.state_dict(), "v2.pt")`` (maybe
wrapped as ``{"model": sd}`` or ``{"state_dict": sd, "epoch": ...}``, maybe with DDP's ``module.`` prefix).
:func:`import_sft` builds your class through :func:`v3kit.train.model.build_model`, reads the file (tensors only),
unwraps and renames its keys, loads the weights with every mismatch reported at once and writes ``sft.pt``
(:mod:`v3kit.train.import_checks`). Public through :mod:`v3kit.train.import_sft`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .checkpoint import CheckpointError, check_finite_weights
from .import_checks import build_imported, check_dims, fit_report, model_changes, write_import
from .model import ModelConfig
from .pretrained import ST_MODULES_FILE, is_pretrained_dir

# Keys under which training scripts commonly nest the weights, tried in this order (Lightning, HF Trainer-style
# dicts, hand-written {"model": sd, "optimizer": ..., "epoch": ...}).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes every key gets from a wrapper module: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
    changes = model_changes(sim_temperature, interface, methods, temperature_attr)
    changes.update(target=target, kwargs=dict(kwargs if kwargs is not None else base.kwargs))
    cfg = dataclasses.replace(base, **changes)  # re-runs ModelConfig's validation
    check_dims(query_dim, cand_dim)
    raw = read_state_dict(state_dict)  # first: a directory or a foreign file is named before any build error
    model = build_imported(cfg, query_dim, cand_dim)
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
    return write_import(model, cfg, out, query_dim, cand_dim, target, provenance, temperature_attr, temperature_form)
