"""The rules of a decoding schedule that every command shares (decoding and planning alike).
No torch here: `tide plan` checks them too."""

from __future__ import annotations

from tidecli.errors import TideError


def check_schedule(*, gen_length: int, block_length: int, threshold: float,
                   max_positions: int | None = None) -> None:
    """The rules every command's --gen-length, --block-length and --threshold follow (decoding
    and planning alike)."""
    if gen_length < 1:
        raise TideError(f"--gen-length must be at least 1, got {gen_length}",
                        "ask for a positive number of tokens")
    if block_length < 1:
        raise TideError(f"--block-length must be at least 1, got {block_length}",
                        "use 32 (the trained block length)")
    if max_positions is not None and max_positions % block_length:
        raise TideError(f"--block-length {block_length} does not divide the model's "
                        f"{max_positions} positions", "use 32 (the trained block length)")
    if not 0 < threshold <= 1:
        raise TideError(f"--threshold must be in (0, 1], got {threshold}",
                        "0.95 is the LLaDA2.0 default; 0.5-0.7 for 2.1")
