"""Moved to :mod:`v3kit.doctor.verdict_report` (see CHANGELOG.md); this old path warns and is that module."""

from .doctor import verdict_report
from .moved import alias

alias(__name__, verdict_report)
