"""Moved to :mod:`v3kit.data.tables` (see CHANGELOG.md); this old path warns and is that module."""

from .data import tables
from .moved import alias

alias(__name__, tables)
