"""What every Triton kernel of tide needs before it is built: whether Triton imports here (it
ships with PyTorch's CUDA wheels), and tile sizes rounded up to a power of two."""

from __future__ import annotations

import functools


@functools.cache  # asked per layer on the step's path; a failed import is not cheap to retry
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(0, (n - 1).bit_length())
