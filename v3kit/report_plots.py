"""Moved to :mod:`v3kit.notebook.report_plots` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .notebook import report_plots

alias(__name__, report_plots)
