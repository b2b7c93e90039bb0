"""``v3kit.diagnose``: the doctor's public API, kept at its documented import path (the checks live in
:mod:`v3kit.doctor`, whose ``__all__`` is the list)."""

from .doctor import *  # noqa: F403 - the shim re-exports exactly the doctor's public names
from .doctor import __all__  # noqa: F401
