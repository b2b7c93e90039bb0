"""Moved to :mod:`v3kit.train.checkpoint` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import checkpoint

alias(__name__, checkpoint)
