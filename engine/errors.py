"""Errors that are the user's to fix.

A :class:`RenError` carries a one-paragraph message that names what was wrong
and where. The CLI prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

EXIT_FAILED_RUN = 1  # the run or evaluation failed on something other than bad input (docs/cli-json.md)
EXIT_USER_ERROR = 2


class RenError(Exception):
    """Bad input or an unusable environment; the message says how to fix it."""

    exit_code = EXIT_USER_ERROR


class ConfigError(RenError):
    """A preset (or a ``--set`` override) is malformed or invalid. ``key`` is the
    dotted config key the (first) problem is about, when one is known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RunNotFound(RenError):
    """No run in the store matches the given id."""


class StoreError(RenError):
    """The results store cannot be read or written."""


class StoreBusy(StoreError):
    """The store's index lock stayed held by other processes past the timeout (nothing was written)."""


class ModelLoadError(RenError):
    """A backbone could not be loaded (no network, missing directory, unknown name)."""


def oom_message(*, batch_size: int | None, micro_batch_size: int | None, processes: int, where: str) -> str:
    """What a CUDA out-of-memory failure says: the batch in use and what to change."""
    micro = micro_batch_size if micro_batch_size else f"batch_size / {processes} processes"
    return (f"CUDA out of memory on {where} with train.batch_size {batch_size} (micro batch {micro} per process). "
            "Lower train.micro_batch_size (gradient accumulation keeps the global batch), enable "
            "gradient_checkpointing on the towers, or set train.mixed_precision = \"bf16\".")
