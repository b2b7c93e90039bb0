"""Moved to :mod:`v3kit.train.device` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import device

alias(__name__, device)
