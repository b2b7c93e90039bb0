"""Moved to :mod:`v3kit.train.grpo` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import grpo

alias(__name__, grpo)
