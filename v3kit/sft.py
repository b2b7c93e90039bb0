"""Moved to :mod:`v3kit.train.sft` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import sft

alias(__name__, sft)
