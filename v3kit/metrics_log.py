"""Moved to :mod:`v3kit.train.metrics_log` (see CHANGELOG.md); this old path warns and is that module."""

from .moved import alias
from .train import metrics_log

alias(__name__, metrics_log)
