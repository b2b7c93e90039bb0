"""Old import paths of modules that moved: each old path is a one-line shim that calls :func:`alias`.

The package was regrouped by floors (``data/``, ``train/``, ``doctor/``, ``notebook/``); ``CHANGELOG.md`` lists every
move. A shim makes the old path *be* the new module (``v3kit.losses is v3kit.train.losses``), so every name, private
ones and monkeypatching included, behaves as before, and warns once per process with the path to use instead.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType
from typing import Any, Callable


def alias(old: str, new: ModuleType) -> None:
    """Make module ``old`` an alias of ``new`` and emit a DeprecationWarning naming ``new``'s path.

    Called from the old module's body while it is being imported: the import system hands out whatever
    ``sys.modules[old]`` holds when the body ends. ``stacklevel=3`` points at the user's import line (the
    warnings machinery skips the import system's own frames)."""
    warnings.warn(
        f"{old} moved to {new.__name__}; import it from there ({old} will be removed in a future release)",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = new


def moved_names(old: str, new: ModuleType, moved: Callable[[str], bool]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for module ``old``, some of whose names moved to ``new``: a name ``moved``
    accepts is ``new``'s, with a DeprecationWarning naming its new path; any other missing name is an
    AttributeError. Assign it as the old module's ``__getattr__`` (``stacklevel=2`` then points at the user's line)."""

    def __getattr__(name: str) -> Any:
        if moved(name):
            warnings.warn(
                f"{old}.{name} moved to {new.__name__}.{name}; import it from there", DeprecationWarning, stacklevel=2
            )
            return getattr(new, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
