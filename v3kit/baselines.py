"""Moved to :mod:`v3kit.train.baselines` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import baselines

alias(__name__, baselines)
