"""Moved to :mod:`v3kit.train.distributed` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import distributed

alias(__name__, distributed)
