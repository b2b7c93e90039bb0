"""Old import paths of modules that moved: each old path is a one-line shim that calls :func:`alias`.

The package was regrouped by floors (``data/``, ``train/``, ``doctor/``, ``notebook/``); ``CHANGELOG.md`` lists every
move. A shim makes the old path *be* the new module (``v3kit.losses is v3kit.train.losses``), so every name, private
ones and monkeypatching included, behaves as before, and warns once per process with the path to use instead.
"""

from __future__ import annotations

import sys
import warnings
from types import ModuleType


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
