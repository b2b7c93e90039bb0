"""Naming a model class: ``package.module:Class`` (importable, the current directory searched first, as
``python -m`` does) or ``path/to/models.py:Class`` (a file), made absolute for checkpoints (:func:`resolve_target`)
and imported (:func:`import_object`), with one-line errors that say what to fix."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .pretrained import is_pretrained_dir


def is_file_target(target: str) -> bool:
    """``path/to/models.py:Cls`` names a file; ``pkg.models:Cls`` a module on the import path."""
    module_part = target.rpartition(":")[0]
    return module_part.endswith(".py") or "/" in module_part or os.sep in module_part


def resolve_target(target: str, base: str | Path | None = None) -> str:
    """``target`` with a file path made absolute, a relative one against ``base`` (default: the current directory);
    module targets unchanged. The one home of this rule (the notebooks pass the repository as ``base``).

    Checkpoints record the resolved form, so ``eval`` and ``run --sft`` work from any directory later.
    """
    if ":" not in target and is_pretrained_dir(target):
        return str(Path(target).expanduser().resolve())
    if not is_file_target(target):
        return target
    file_part, _, attr = target.rpartition(":")
    path = Path(file_part).expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return f"{path.resolve()}:{attr}"


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


def _import_from_cwd(module_name: str) -> ModuleType:
    """``importlib.import_module`` with the current directory searched first, as ``python -m`` does, so a
    ``pkg.module:Class`` beside the user works without PYTHONPATH (only during the import: sys.path is restored)."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        return importlib.import_module(module_name)
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(cwd)


def import_object(target: str) -> Any:
    """The object ``target`` names: ``package.module:Name`` (importable) or ``path/to/file.py:Name``."""
    module_name, _, attr = target.rpartition(":")
    if is_file_target(target):
        module = _import_file(target, module_name)
    else:
        try:
            module = _import_from_cwd(module_name)
        except ImportError as e:
            missing = getattr(e, "name", None)
            if missing and (module_name == missing or module_name.startswith(missing + ".")):
                raise ValueError(
                    f"model.target {target!r}: cannot import module {module_name!r} ({e}) from the current directory "
                    f"({Path.cwd()}) or the import path; run v3kit from the directory that holds "
                    f"{missing.split('.')[0]!r}, put that directory on PYTHONPATH, or name the file instead: "
                    "model.target: path/to/models.py:ClassName"
                ) from None
            raise ValueError(f"model.target {target!r}: importing module {module_name!r} failed ({e})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"model.target {target!r}: module {module_name!r} has no attribute {attr!r}") from None
