"""Streaming safetensors writer: header first, then each tensor's bytes as it is produced.

Memory stays at one tensor however large the shard. The files are the standard format (8-byte
little-endian header length, JSON header padded with spaces to 8 bytes, contiguous data);
tests read them back with the safetensors library.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

_CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
          torch.int64: "I64", torch.int32: "I32"}


Entry = tuple[str, torch.dtype, tuple[int, ...]]


def header_bytes(entries: list[Entry]) -> tuple[bytes, list[int]]:
    """(header blob with its length prefix, byte size of each entry)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = []
    for name, dtype, shape in entries:
        numel = 1
        for d in shape:
            numel *= d
        size = numel * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, sizes


def write_shard(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                tensors: Iterable[torch.Tensor], *, progress: Callable[[int], None] | None = None
                ) -> None:
    """Write `entries` (name, dtype, shape) whose data `tensors` yields in the same order."""
    head, sizes = header_bytes(entries)
    with open(path, "wb") as fh:
        fh.write(head)
        for (name, dtype, shape), size, t in zip(entries, sizes, tensors, strict=True):
            t = t.detach().to("cpu", dtype=dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise AssertionError(f"{name}: produced {tuple(t.shape)}, declared {shape}")
            data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            if len(data) != size:
                raise AssertionError(f"{name}: {len(data)} bytes, declared {size}")
            fh.write(data)
            if progress:
                progress(size)
        fh.flush()
        os.fsync(fh.fileno())
