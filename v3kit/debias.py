"""Moved to :mod:`v3kit.data.debias` (see CHANGELOG.md); this old path warns and is that module."""

from .data import debias
from .moved import alias

alias(__name__, debias)
