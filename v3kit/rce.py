"""Moved to :mod:`v3kit.train.rce` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import rce

alias(__name__, rce)
