"""Moved to :mod:`v3kit.train.training` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import training

alias(__name__, training)
