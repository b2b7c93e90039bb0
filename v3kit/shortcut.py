"""Moved to :mod:`v3kit.data.shortcut` (see CHANGELOG.md); this old path warns and is that module."""

from .data import shortcut
from .moved import alias

alias(__name__, shortcut)
