"""The one error type a user can cause, and how the CLI reports it."""

from __future__ import annotations


class TideError(Exception):
    """Something the user can fix: a one-line message plus what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # keeps pytest output and logs readable
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class OutOfDeviceMemory(TideError):
    """The accelerator ran out of memory during a step; the session survives it."""
