"""Moved to :mod:`v3kit.notebook.grpo_panel` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .notebook import grpo_panel

alias(__name__, grpo_panel)
