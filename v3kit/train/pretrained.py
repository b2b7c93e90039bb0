"""Hugging Face models as they are saved: a ``save_pretrained`` directory as ``model.target``.

A ``PreTrainedModel`` subclass saved with ``model.save_pretrained(DIR)`` leaves ``DIR/config.json`` (its
``PretrainedConfig``, with ``architectures`` and, for a class registered with ``register_for_auto_class``, an
``auto_map`` naming the modeling file copied beside it) and the weights (``model.safetensors``). v3kit builds such a
model with ``cls.from_pretrained(DIR)``, the class coming from ``auto_map`` (the file in ``DIR``), from
``architectures`` (a class transformers itself defines) or from an explicit ``pkg.module:Class``.

A class whose constructor takes ``config`` (every ``PreTrainedModel``) also builds from ``model.kwargs: {config:
{...}}``: the dict (``config.json``'s contents) is turned into the class's ``config_class`` first, so checkpoints
that record the class and its config rebuild it without the directory.

transformers is imported only when a directory or a ``PreTrainedModel`` is actually built.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

CONFIG_FILE = "config.json"
ST_MODULES_FILE = "modules.json"  # what sentence-transformers' .save() writes beside config.json


def is_pretrained_dir(target: str | os.PathLike) -> bool:
    """``target`` is a directory holding a ``config.json`` (a ``save_pretrained`` output)."""
    try:
        path = Path(target).expanduser()
        return path.is_dir() and (path / CONFIG_FILE).is_file()
    except (OSError, ValueError):
        return False


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory).expanduser() / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def class_target(directory: str | os.PathLike) -> tuple[str, str]:
    """``(target, where)``: the ``path/to/modeling.py:Class`` or ``transformers:Class`` that built the model saved
    in ``directory``, and which entry of its config.json named it."""
    directory = Path(directory).expanduser().resolve()
    cfg = read_config_json(directory)
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    auto_map = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    # auto_map: {"AutoModel": "modeling_x.MyRanker"} (or "repo--modeling_x.MyRanker" for code on the Hub)
    for key in ("AutoModel", *sorted(k for k in auto_map if k != "AutoConfig")):
        ref = auto_map.get(key)
        if isinstance(ref, (list, tuple)):
            ref = ref[0]
        if isinstance(ref, str) and "." in ref:
            module, _, name = ref.split("--")[-1].rpartition(".")
            path = directory / (module.replace(".", "/") + ".py")
            if path.is_file():
                return f"{path}:{name}", f"auto_map.{key}"
    if archs:
        try:
            import transformers
        except ImportError:
            raise ImportError(f"{directory} is a Hugging Face model; pip install transformers") from None
        if hasattr(transformers, archs[0]):
            return f"transformers:{archs[0]}", "architectures"
        raise ValueError(
            f"{directory / CONFIG_FILE} names the class {archs[0]!r} (architectures), which transformers does not "
            "define and no auto_map file in the directory locates; name it: --target pkg.module:"
            f"{archs[0]} (or model.target: pkg.module:{archs[0]} with model.kwargs: {{config: ...}}), or save the "
            "model after MyModel.register_for_auto_class('AutoModel') so save_pretrained copies its file beside it"
        )
    raise ValueError(
        f"{directory / CONFIG_FILE} has neither architectures nor auto_map, so the model class is unknown; name "
        "it with --target pkg.module:Class"
    )


def _float32(model: nn.Module) -> nn.Module:
    # transformers 5 loads in the saved dtype ("auto"); every stage trains and compares float32 log-probs.
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model


def from_pretrained(cls: Any, directory: str | os.PathLike, target: str) -> nn.Module:
    """``cls.from_pretrained(directory)`` in float32, with a one-line error for what does not load."""
    if not callable(getattr(cls, "from_pretrained", None)):
        raise ValueError(
            f"{target} ({getattr(cls, '__name__', cls)}) has no from_pretrained, so it cannot load the "
            f"save_pretrained directory {directory}; pass a PreTrainedModel subclass"
        )
    try:
        model = cls.from_pretrained(str(directory))
    except Exception as e:  # missing weights, a config the class rejects, ...
        first = (str(e).splitlines() or [""])[0][:240]
        raise ValueError(
            f"{getattr(cls, '__name__', cls)}.from_pretrained({str(directory)!r}) failed ({type(e).__name__}: {first})"
        ) from None
    return _float32(model)


def wants_config(cls: Any) -> bool:
    """``cls`` is a Hugging Face model class whose constructor takes a ``PretrainedConfig`` as ``config``."""
    return isinstance(cls, type) and isinstance(getattr(cls, "config_class", None), type) and _has_param(cls, "config")


def _has_param(cls: Any, name: str) -> bool:
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def config_kwargs(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with a ``config`` dict (``config.json``'s contents) turned into ``cls.config_class``."""
    given = kwargs.get("config")
    if not (isinstance(given, dict) and wants_config(cls)):
        return kwargs
    config_cls: Callable[..., Any] = cls.config_class
    try:
        config = config_cls.from_dict(dict(given))
    except Exception as e:
        raise ValueError(
            f"model.kwargs.config could not be turned into {config_cls.__name__} ({type(e).__name__}: {e}); pass "
            "the contents of the config.json save_pretrained wrote"
        ) from None
    return {**kwargs, "config": config}
