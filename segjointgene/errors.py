"""Exceptions for bad user input (layer 0).

Every error a user can fix derives from :class:`UserError`; the CLI prints its message on one line and exits with
status 2. The subclasses also derive from the matching built-in type, so library callers can catch ``ValueError``,
``FileNotFoundError`` or ``KeyError`` as usual.
"""

from __future__ import annotations


class UserError(Exception):
    """An input or argument the user can fix; the message names the file or argument and the fix."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataError(UserError, ValueError):
    """A file or value with the wrong content, shape or dtype."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A required file or folder is missing."""


class ColumnError(UserError, KeyError):
    """A table lacks a required column."""


class ConfigError(UserError, ValueError):
    """An argument value that cannot work (e.g. a patch size the UNet cannot take)."""
