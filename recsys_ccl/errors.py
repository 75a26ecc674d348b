"""Exceptions whose message is meant for the user: the CLI prints them as one line."""

from __future__ import annotations

__all__ = ["DataError", "RecsysError"]


class RecsysError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class DataError(RecsysError):
    """Bad or unusable interaction data: missing file or column, wrong type, empty result."""
