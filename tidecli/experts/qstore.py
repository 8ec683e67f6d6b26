"""Host stores and device pools of compressed experts (experts/formats.py), fed by the cache
(experts/qcache.py).

- `CompressedHostStore`: every expert's compressed row in (pinned) RAM, read from the cache and
  checked row by row; when there is no usable cache, quantized from the checkpoint into RAM and
  then cached (without disk space: not cached, and a notice says so).
- `CompressedTieredStore`: the tiered store (experts/tiered.py) over the cache file instead of
  the checkpoint: its RAM tier and its disk reads move compressed rows, so the disk tier reads
  fewer bytes too. It needs the cache on disk.
- `load_compressed_pools`: every expert on the device (the resident runtime) from the cache,
  through a small pinned staging buffer; without disk space for a cache, quantized straight
  into the device pools.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tidecli.errors import TideError
from tidecli.experts.formats import ExpertFormat
from tidecli.experts.info import StoreInfo
from tidecli.experts.qcache import (
    ExpertCache,
    cache_folder,
    damaged_note,
    ensure_cache,
    open_cache,
    quantized_chunks,
    total_bytes,
    write_cache,
)
from tidecli.experts.staging import Tag
from tidecli.experts.store import HostExpertStore
from tidecli.experts.tiered import TieredExpertStore
from tidecli.memory import HostPlan
from tidecli.model.checkpoint import Checkpoint

Tick = Callable[[int], None]
Ticker = Callable[[str, int], Tick]  # (stage, total bytes) → tick(bytes done since last call)
READ_ROWS = 32  # rows read (and checked) at a time


def _no_ticks(stage: str, total: int) -> Tick:
    return lambda n: None


def _checker() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="tide-crc")


def _read_layers(cache: ExpertCache, dest: dict[int, torch.Tensor], tick: Tick) -> str | None:
    """Fill dest[layer] [E, row] (host, contiguous) from the cache, checking every row's CRC.
    Returns what is wrong at the first bad row (None: all good)."""
    with _checker() as pool:
        for layer, buf in dest.items():
            for first in range(0, buf.shape[0], READ_ROWS):
                part = buf[first: first + READ_ROWS]
                cache.read(layer, first, part)
                bad = cache.bad_row(layer, first, part, pool)
                if bad is not None:
                    return f"layer {layer}, expert {bad}: checksum mismatch"
                tick(part.numel())
    return None


class CompressedHostStore(HostExpertStore):
    """layer → [E, row bytes] uint8 host tensor of compressed rows (HostExpertStore's interface:
    the streamed runtime maps these rows into the GPU as it maps bf16 ones)."""

    def __init__(self, ckpt: Checkpoint, fmt: ExpertFormat, *, pin: bool, device: torch.device,
                 ticker: Ticker | None = None, notices: list[str] | None = None) -> None:
        # a HostExpertStore filled from the cache, not from the checkpoint: its own constructor
        t0 = time.perf_counter()
        ticker = ticker or _no_ticks
        notices = notices if notices is not None else []
        need = self._allocate(ckpt.config, torch.uint8, fmt.row_bytes, pin=pin, fmt=fmt)
        cache, why = open_cache(ckpt, fmt)
        if cache is not None:
            why = _read_layers(cache, self.layers, ticker(f"{fmt.name} experts", need))
            folder = cache.folder
            cache.close()
            if why is None:
                self.info = StoreInfo(need, self.pinned, self.pin_error, time.perf_counter() - t0)
                return
            notices.append(damaged_note(fmt, folder, why))
        elif why is not None:
            notices.append(damaged_note(fmt, cache_folder(ckpt, fmt), why))
        tick = ticker(f"quantize {fmt.name}", ckpt.routed_expert_bytes())
        for layer, first, rows in quantized_chunks(ckpt, fmt, device=device, progress=tick):
            self.layers[layer][first: first + rows.shape[0]].copy_(rows)
        try:
            write_cache(ckpt, fmt, ((layer, 0, buf) for layer, buf in self.layers.items())).close()
        except TideError as exc:
            notices.append(f"the {fmt.name} experts are quantized in RAM but not cached "
                           f"({exc.message}): the next start quantizes them again")
        self.info = StoreInfo(need, self.pinned, self.pin_error, time.perf_counter() - t0)


class CompressedTieredStore(TieredExpertStore):
    """The tiered store over the compressed cache: RAM tier and disk reads in compressed rows; a
    row read from disk is checked against its CRC the first time."""

    def __init__(self, ckpt: Checkpoint, fmt: ExpertFormat, cache: ExpertCache, host: HostPlan,
                 *, pin: bool, popularity: dict[int, np.ndarray] | None = None,
                 skip: dict[int, int] | None = None, readers: int = 2,
                 progress: Tick | None = None) -> None:
        self.format, self.cache = fmt, cache  # the hooks below read them during construction
        super().__init__(ckpt, host, pin=pin, popularity=popularity, skip=skip, readers=readers,
                         progress=progress)

    def _row_layout(self) -> tuple[torch.dtype, int]:
        return torch.uint8, self.format.row_bytes

    def _load_ram(self, chosen: dict[int, list[int]], progress: Tick | None) -> None:
        with _checker() as pool:
            for layer, experts in chosen.items():
                for j, e in enumerate(experts):  # one row at a time: the chosen are scattered
                    row = self.ram[layer][j: j + 1]
                    self.cache.read(layer, e, row)
                    if self.cache.bad_row(layer, e, row, pool) is not None:
                        self._damaged(layer, e)
                    if progress:
                        progress(self.expert_bytes)

    def _read(self, tag: Tag, buf: torch.Tensor) -> None:
        self.cache.read(tag[0], tag[1], buf[None])

    def _verify(self, tag: Tag, buf: torch.Tensor) -> None:
        layer, e = tag
        if self._checked[layer][e]:
            return
        if self.cache.bad_row(layer, e, buf[None]) is not None:
            self._damaged(layer, e)
        self._checked[layer][e] = True

    def _damaged(self, layer: int, e: int) -> None:
        self.cache.invalidate()
        raise TideError(f"the {self.format.name} expert cache at {self.cache.folder} is damaged "
                        f"(layer {layer}, expert {e}: checksum mismatch)",
                        "run again: tide rebuilds the cache at the next start")

    def close(self) -> None:
        super().close()
        self.cache.close()


def load_compressed_pools(ckpt: Checkpoint, fmt: ExpertFormat, *, device: torch.device,
                          ticker: Ticker | None = None,
                          notices: list[str] | None = None) -> dict[int, torch.Tensor]:
    """Every routed expert's compressed row on `device`, one [E, row] uint8 pool per MoE layer:
    from the cache (built first when missing or damaged); without disk space for the cache,
    quantized straight into the pools (a notice says so)."""
    cfg = ckpt.config
    ticker = ticker or _no_ticks
    notices = notices if notices is not None else []
    pools = {layer: torch.empty((cfg.num_experts, fmt.row_bytes), dtype=torch.uint8,
                                device=device) for layer in cfg.moe_layers}
    quantize = ticker(f"quantize {fmt.name}", ckpt.routed_expert_bytes())
    for _attempt in range(2):  # a damaged cache is rebuilt once
        try:
            cache = ensure_cache(ckpt, fmt, device=device, progress=quantize, notices=notices)
        except TideError as exc:
            notices.append(f"the {fmt.name} experts are not cached ({exc.message}): quantized "
                           "straight to the device; the next start quantizes them again")
            for layer, first, rows in quantized_chunks(ckpt, fmt, device=device,
                                                       progress=quantize):
                pools[layer][first: first + rows.shape[0]].copy_(rows)
            return pools
        why = _copy_to_pools(cache, pools, ticker(f"{fmt.name} experts",
                                                  total_bytes(ckpt, fmt)))
        cache.close()
        if why is None:
            return pools
        cache.invalidate()
        notices.append(damaged_note(fmt, cache.folder, why))
    raise TideError(f"the {fmt.name} expert cache is damaged again right after it was rebuilt",
                    "check the disk (or the memory) of this machine")


def _copy_to_pools(cache: ExpertCache, pools: dict[int, torch.Tensor], tick: Tick) -> str | None:
    cuda = next(iter(pools.values())).is_cuda if pools else False
    row = cache.format.row_bytes
    staging = [torch.empty((READ_ROWS, row), dtype=torch.uint8, pin_memory=cuda)
               for _ in range(2)]
    done: list[torch.cuda.Event | None] = [None, None]
    with _checker() as pool:
        n = 0
        for layer, dst in pools.items():
            for first in range(0, dst.shape[0], READ_ROWS):
                i = n % 2
                n += 1
                if done[i] is not None:
                    done[i].synchronize()  # the copy that last read this buffer has finished
                part = staging[i][: min(READ_ROWS, dst.shape[0] - first)]
                cache.read(layer, first, part)
                bad = cache.bad_row(layer, first, part, pool)
                if bad is not None:
                    return f"layer {layer}, expert {bad}: checksum mismatch"
                dst[first: first + part.shape[0]].copy_(part, non_blocking=cuda)
                if cuda:
                    done[i] = torch.cuda.Event()
                    done[i].record()
                tick(part.numel())
    if cuda:
        torch.cuda.synchronize()
    return None
