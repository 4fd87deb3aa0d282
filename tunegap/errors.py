"""Errors every layer may raise, defined at the bottom so that `costs/` needs nothing above it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work, reported before any work starts."""
