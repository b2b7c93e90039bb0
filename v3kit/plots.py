"""Moved to :mod:`v3kit.notebook.plots` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .notebook import plots

alias(__name__, plots)
