"""Errors a user can fix (bad path, bad parameter, mismatched models). The CLI prints them as one line,
without a traceback; library users catch them as ValueError subclasses."""
from __future__ import annotations


class RastError(ValueError):
    """A user-facing error with a clear, actionable message."""


class ModelLoadError(RastError):
    """A model directory is missing, incomplete or inconsistent with the other models."""
