"""Moved to :mod:`v3kit.doctor.grid` (see CHANGELOG.md); this old path warns and is that module."""

from .doctor import grid
from .moved import alias

alias(__name__, grid)
