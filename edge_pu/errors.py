"""The one error type the CLI turns into a clear message and a non-zero exit."""

from __future__ import annotations


class EdgePuError(Exception):
    """A user-facing error: the message names the file, line or field at fault and what to do.

    The CLI prints it as one paragraph and exits with `exit_code`; it never prints a traceback
    for these.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NothingToTrain(EdgePuError):
    """A PU round whose candidates all tied (or train.select left every prompt out): the ranking
    gave no training signal. `edge-pu run` stops on it; `edge-pu eval` records the method as
    trained on the SFT stage alone."""
