"""Moved to :mod:`v3kit.doctor.rce_analysis` (see CHANGELOG.md); this old path warns and is that module."""

from .doctor import rce_analysis
from .moved import alias

alias(__name__, rce_analysis)
