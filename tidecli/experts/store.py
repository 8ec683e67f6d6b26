"""The host expert store: every routed expert in (pinned) host memory, one contiguous row each.

Experts stream shard by shard straight into their final place (one `readinto` per tensor, no
staging copy), so the extra memory while loading is bounded by nothing but the page cache. A row
is [gate (I·H) | up (I·H) | down (H·I)] in the stored dtype: one copy moves one expert.

`ExpertSource` is what the slot pools and the CPU workers use; the tiered store
(experts/tiered.py) implements it too, for models larger than RAM.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch

from tidecli.experts.formats import ExpertFormat
from tidecli.experts.info import StoreInfo
from tidecli.experts.runtime import read_expert_packed
from tidecli.memory import check_fits_ram
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tensorio import ShardReader, torch_dtype


def allocate_host(shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """One host buffer; pinned when asked (page-locked memory: async copies, 3-4× faster)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class ExpertBatch:
    """Experts of one layer whose host rows stay valid until the consumer moves on to the next
    batch. A consumer whose device copies still read the rows sets `release_after` (a CUDA
    event recorded after those copies) before it does."""

    def __init__(self, experts: list[int], row: Callable[[int], torch.Tensor]) -> None:
        self.experts = experts
        self._row = row
        self.release_after: object | None = None

    def row(self, e: int) -> torch.Tensor:
        """The packed row [3·I·H] of expert e (waits for its read when it comes from disk)."""
        return self._row(e)


class ExpertSource(ABC):
    """Host rows of routed experts, as the slot pools and the CPU workers read them. A store
    implements `batches`."""

    cfg: object
    dtype: torch.dtype  # uint8 for a compressed format
    row: int  # elements per packed expert row (bytes for a compressed format)
    info: StoreInfo
    format: ExpertFormat | None = None  # compressed rows (experts/formats.py); None: checkpoint's
    pinned: bool = False
    pin_error: str | None = None

    @abstractmethod
    def batches(self, layer: int, experts: list[int]) -> Iterator[ExpertBatch]:
        """The rows of `experts` (distinct), in one or more batches."""

    def _alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Pinned while pinning works (`self.pinned`), else pageable, with one warning."""
        if self.pinned:
            try:
                return allocate_host(shape, self.dtype, pin=True)
            except RuntimeError as exc:
                self.pinned = False
                self.pin_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                warnings.warn(
                    f"pinned host memory is not available ({self.pin_error}); experts use pageable "
                    "memory, so copies to the GPU are slower", RuntimeWarning, stacklevel=2)
                # earlier layers stay pinned; that is fine, copies from them are still correct
        return allocate_host(shape, self.dtype, pin=False)

    def drain_counters(self) -> dict[int, dict[str, float]]:
        """Per layer: disk reads and waits since the last call (none for an all-RAM store)."""
        return {}

    @property
    def disk_wait_s(self) -> float:
        """Seconds the caller has waited for disk reads so far (a running total)."""
        return 0.0

    def close(self) -> None:
        """Stop reader threads and close files."""
        return None


class HostExpertStore(ExpertSource):
    """layer → [E, 3·I·H] host tensor in the checkpoint's dtype."""

    def __init__(self, ckpt: Checkpoint, *, pin: bool, check_finite: bool = True,
                 progress: Callable[[int], None] | None = None) -> None:
        t0 = time.perf_counter()
        cfg = ckpt.config
        need = self._allocate(cfg, torch_dtype(ckpt.expert_dtype()), cfg.expert_params, pin=pin)
        with ShardReader() as reader:
            for layer in cfg.moe_layers:
                buf = self.layers[layer]
                for e in range(cfg.num_experts):
                    read_expert_packed(reader, ckpt, layer, e, buf[e], check=check_finite)
                    if progress:
                        progress(self.row * self.dtype.itemsize)
        self.info = StoreInfo(need, self.pinned, self.pin_error, time.perf_counter() - t0)

    def _allocate(self, cfg, dtype: torch.dtype, row: int, *, pin: bool,
                  fmt: ExpertFormat | None = None) -> int:
        """Every layer's [E, row] buffer (pinned while pinning works), once the RAM is known to
        hold them; returns their bytes. Subclasses fill the rows from elsewhere."""
        self.cfg, self.dtype, self.row, self.format = cfg, dtype, row, fmt
        need = cfg.num_moe_layers * cfg.num_experts * row * dtype.itemsize
        check_fits_ram(need)
        self.pinned, self.pin_error = pin, None
        self.layers: dict[int, torch.Tensor] = {
            layer: self._alloc((cfg.num_experts, row)) for layer in cfg.moe_layers}
        return need

    def expert(self, layer: int, e: int) -> torch.Tensor:
        return self.layers[layer][e]

    def batches(self, layer: int, experts: list[int]) -> Iterator[ExpertBatch]:
        rows = self.layers[layer]
        yield ExpertBatch(list(experts), lambda e: rows[e])

    @property
    def nbytes(self) -> int:
        return self.info.bytes
