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


OOM_HINT = "lower --vram or --experts-per-layer, or ask for fewer tokens (--gen-length)"


def out_of_memory(exc: BaseException, *, hint: str = OOM_HINT) -> TideError | None:
    """The TideError for an allocation failure (GPU or host), None for any other exception.

    Matched by name so that this module (and `tide --help`) never imports torch.
    """
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, torch.cuda's alias
        return OutOfDeviceMemory("the GPU ran out of memory", hint)
    if isinstance(exc, MemoryError) or (
            isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return TideError("the host ran out of memory (RAM)",
                         "close other programs, or use a smaller model or --gen-length")
    return None
