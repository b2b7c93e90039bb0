"""Moved to :mod:`v3kit.notebook.live` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .notebook import live

alias(__name__, live)
