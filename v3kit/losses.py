"""Moved to :mod:`v3kit.train.losses` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import losses

alias(__name__, losses)
