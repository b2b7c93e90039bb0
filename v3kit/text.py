"""Moved to :mod:`v3kit.data.text` (see CHANGELOG.md); this old path warns and is that module."""

from .data import text
from .moved import alias

alias(__name__, text)
