"""Moved to :mod:`v3kit.doctor.investigate` (see CHANGELOG.md); this old path warns and is that module."""

from .doctor import investigate
from .moved import alias

alias(__name__, investigate)
