"""Reading experts straight from pinned host memory on the GPU, without the host in the loop.

Page-locked memory that CUDA allocated is mapped into the GPU's address space (unified
addressing), so a kernel can load from it over PCIe. `device_view` wraps such a buffer as a CUDA
tensor (no copy, the same bytes); `copy_rows` gathers rows chosen by a device index into device
rows, skipping entries marked -1, so how many rows move is decided on the GPU. How fast such
reads are against the copy engine: docs/benchmarks.md.

On a CPU device the same calls work on the host tensors themselves (tests).
"""

from __future__ import annotations

import functools

import torch

from tidecli.model.triton_util import triton_importable

# Programs per gathered row, each looping over its share of the row's blocks: a few dozen
# programs keep PCIe busy, and the rest of the GPU stays free for the experts computing beside
# the gather (experts/stream.py)
PROGRAMS_PER_ROW = 4


class _CudaArray:
    """The __cuda_array_interface__ of a pinned host buffer (read as int64 words or narrower)."""

    def __init__(self, t: torch.Tensor, word: torch.dtype) -> None:
        size = torch.empty((), dtype=word).element_size()
        rows = t.shape[0]
        cols = t[0].numel() * t.element_size() // size if rows else 0
        typestr = {8: "<i8", 4: "<i4", 2: "<i2", 1: "|u1"}[size]
        self.__cuda_array_interface__ = {"shape": (rows, cols), "typestr": typestr,
                                         "data": (t.data_ptr(), False), "version": 3,
                                         "strides": None}


def word_dtype(row_bytes: int) -> torch.dtype:
    """The widest integer word that divides a row (wide loads move PCIe data faster)."""
    for dt, n in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row_bytes % n == 0:
            return dt
    return torch.uint8


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on `device` reading `host` [rows, ...] in place, same shape and dtype.

    `host` must be contiguous and pinned; on a CPU device it is returned as is. The caller keeps
    `host` alive as long as the view is used.
    """
    if device.type != "cuda":
        return host
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("device_view needs a contiguous pinned host tensor")
    row_bytes = host[0].numel() * host.element_size()
    word = word_dtype(row_bytes)
    flat = torch.as_tensor(_CudaArray(host, word), device=device)
    return flat.view(host.dtype).view(host.shape)


def stream_available(device: torch.device) -> str | None:
    """None when rows can be gathered on `device` without the host, else why not."""
    if device.type != "cuda":
        return None
    if not triton_importable():
        return "triton is not installed (it ships with PyTorch's CUDA wheels)"
    return None


@functools.cache
def _kernel():  # built on first use: Triton is imported only then
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows(src, src_idx, dst, dst_idx, ncols, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        e = tl.load(src_idx + i)
        if e >= 0:
            d = tl.load(dst_idx + i)
            for c in range(tl.program_id(1), tl.cdiv(ncols, BLOCK), tl.num_programs(1)):
                offs = c * BLOCK + tl.arange(0, BLOCK)
                m = offs < ncols
                v = tl.load(src + e.to(tl.int64) * ncols + offs, mask=m)
                tl.store(dst + d.to(tl.int64) * ncols + offs, v, mask=m)

    return gather_rows, triton.cdiv


def copy_rows(src: torch.Tensor, src_idx: torch.Tensor, dst: torch.Tensor,
              dst_idx: torch.Tensor) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]] for every i with src_idx[i] >= 0; rows of equal size.

    On CUDA one kernel whose programs for skipped entries return at once: no host sync, and the
    bytes moved are those of the rows asked for. Graph-capturable.
    """
    if src.device.type != "cuda":
        take = src_idx >= 0
        if bool(take.any()):
            dst[dst_idx[take]] = src[src_idx[take]].to(dst.dtype)
        return
    kernel, cdiv = _kernel()
    row_bytes = src[0].numel() * src.element_size()
    word = word_dtype(row_bytes)
    s = src.view(word).view(src.shape[0], -1)
    d = dst.view(word).view(dst.shape[0], -1)
    ncols = s.shape[1]
    block = 4096
    per_row = min(cdiv(ncols, block), PROGRAMS_PER_ROW)
    kernel[(src_idx.numel(), per_row)](s, src_idx, d, dst_idx, ncols, BLOCK=block)
