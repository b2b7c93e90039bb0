"""Moved to :mod:`v3kit.data.ingest` (see CHANGELOG.md); this old path warns and is that module."""

from .data import ingest
from .moved import alias

alias(__name__, ingest)
