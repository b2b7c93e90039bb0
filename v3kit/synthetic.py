"""Moved to :mod:`v3kit.data.synthetic` (see CHANGELOG.md); this old path warns and is that module."""

from .data import synthetic
from .moved import alias

alias(__name__, synthetic)
