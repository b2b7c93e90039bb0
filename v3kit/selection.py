"""Moved to :mod:`v3kit.train.selection` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import selection

alias(__name__, selection)
