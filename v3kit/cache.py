"""Moved to :mod:`v3kit.data.cache` (see CHANGELOG.md); this old path warns and is that module."""

from .data import cache
from .moved import alias

alias(__name__, cache)
