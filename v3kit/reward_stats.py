"""Moved to :mod:`v3kit.data.reward_stats` (see CHANGELOG.md); this old path warns and is that module."""

from .data import reward_stats
from .moved import alias

alias(__name__, reward_stats)
