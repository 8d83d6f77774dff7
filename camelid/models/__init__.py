"""Resolve model names to weights on disk, and load them for inference or training."""

from camelid.models.resolve import BUNDLED, DEFAULT_MODEL, resolve_model

__all__ = ["BUNDLED", "DEFAULT_MODEL", "resolve_model"]
