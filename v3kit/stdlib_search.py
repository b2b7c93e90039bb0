"""Moved to :mod:`v3kit.data.stdlib_search` (see CHANGELOG.md); this old path warns and is that module."""

from .data import stdlib_search
from .moved import alias

alias(__name__, stdlib_search)
