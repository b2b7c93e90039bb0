"""Moved to :mod:`v3kit.train.metrics` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import metrics

alias(__name__, metrics)
