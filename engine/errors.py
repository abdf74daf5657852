"""Errors that are the user's to fix.

A :class:`RenError` carries a one-paragraph message that names what was wrong
and where. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class RenError(Exception):
    """Bad input or an unusable environment; the message says how to fix it."""

    exit_code = EXIT_USER_ERROR


class ConfigError(RenError):
    """A preset (or a ``--set`` override) is malformed or invalid."""


class RunNotFound(RenError):
    """No run in the store matches the given id."""


class StoreError(RenError):
    """The results store cannot be read or written."""


class ModelLoadError(RenError):
    """A backbone could not be loaded (no network, missing directory, unknown name)."""
