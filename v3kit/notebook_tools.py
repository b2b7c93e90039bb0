"""Moved to :mod:`v3kit.notebook.tools` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .notebook import tools

alias(__name__, tools)
