"""Moved to :mod:`v3kit.train.import_sft` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import import_sft

alias(__name__, import_sft)
