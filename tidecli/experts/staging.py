"""The staging ring: a bounded set of reusable (pinned) host buffers through which experts read
from disk pass on their way to the GPU slots or the CPU workers.

Reads run on a small pool of reader threads while the caller computes. A buffer keeps its
expert's tag after use, so an expert asked for again before its buffer is reused is not read
twice. A buffer is reused only when nobody holds it and the device copy that last read it (a
CUDA event) has finished. Only the calling thread touches the ring's tables; reader threads only
fill buffers. Buffers are allocated on first use, never more than `capacity`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Tag = tuple[int, int]  # (layer, expert)


class StagingRing:
    def __init__(self, capacity: int, *, alloc: Callable[[], torch.Tensor],
                 reader: Callable[[Tag, torch.Tensor], None],
                 verify: Callable[[Tag, torch.Tensor], None] | None = None,
                 threads: int = 2) -> None:
        if capacity < 1:
            raise ValueError("a staging ring needs at least one buffer")
        self.capacity = capacity
        self._alloc = alloc
        self._reader = reader
        self._verify = verify
        self.bufs: list[torch.Tensor] = []
        self._tag: list[Tag | None] = []
        self._pins: list[int] = []
        self._future: list[Future | None] = []
        self._fresh: list[bool] = []  # filled but not yet verified
        self._busy: list[object | None] = []  # CUDA event of the last copy out of the buffer
        self._free: OrderedDict[int, None] = OrderedDict()  # unheld buffers, least recent first
        self._where: dict[Tag, int] = {}
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None  # started on the first read
        self.counts: dict[int, list[float]] = {}  # layer → [reads, reuses, wait seconds]
        self.wait_s = 0.0  # every wait for a read, a running total

    # ---- accounting -----------------------------------------------------------------------------

    @property
    def allocated(self) -> int:
        return len(self.bufs)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs)

    def available(self) -> int:
        """Buffers a new `acquire` can take without waiting for a holder."""
        return self.capacity - len(self.bufs) + len(self._free)

    def _count(self, layer: int, i: int, value: float = 1.0) -> None:
        c = self.counts.setdefault(layer, [0.0, 0.0, 0.0])
        c[i] += value

    def drain_counts(self) -> dict[int, list[float]]:
        out, self.counts = self.counts, {}
        return out

    # ---- buffers --------------------------------------------------------------------------------

    def _settle(self, i: int) -> None:
        """Wait until nothing reads or writes buffer i (its read, its last device copy)."""
        f, self._future[i] = self._future[i], None
        if f is not None:
            try:
                f.result()
            except BaseException:  # noqa: BLE001 - the buffer is being reused, not read
                pass
        ev, self._busy[i] = self._busy[i], None
        if ev is not None:
            ev.synchronize()

    def _take(self) -> int:
        if len(self.bufs) < self.capacity:
            self.bufs.append(self._alloc())
            self._tag.append(None)
            self._pins.append(0)
            self._future.append(None)
            self._fresh.append(False)
            self._busy.append(None)
            return len(self.bufs) - 1
        if not self._free:
            raise RuntimeError("staging ring exhausted: every buffer is held")
        # the least recently used buffer whose last copy has finished, else the least recent
        pick = next((i for i in self._free
                     if self._busy[i] is None or self._busy[i].query()), next(iter(self._free)))
        del self._free[pick]
        self._settle(pick)
        old = self._tag[pick]
        if old is not None:
            self._where.pop(old, None)
            self._tag[pick] = None
        return pick

    def acquire(self, tags: list[Tag]) -> list[int]:
        """Hold a buffer for each tag, starting the reads of those not already staged."""
        if len(tags) > self.available():
            raise RuntimeError(f"staging ring: {len(tags)} buffers asked, "
                               f"{self.available()} available")
        out = []
        for tag in tags:
            i = self._where.get(tag)
            if i is not None:
                self._count(tag[0], 1)
            else:
                i = self._take()
                self._tag[i] = tag
                self._where[tag] = i
                self._fresh[i] = True
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tide-read")
                self._future[i] = self._pool.submit(self._reader, tag, self.bufs[i])
                self._count(tag[0], 0)
            if self._pins[i] == 0:
                self._free.pop(i, None)
            self._pins[i] += 1
            out.append(i)
        return out

    def _drop(self, i: int) -> None:
        tag = self._tag[i]
        if tag is not None:
            self._where.pop(tag, None)
        self._tag[i] = None

    def row(self, i: int) -> torch.Tensor:
        """Buffer i once its read has finished (and its content was checked once)."""
        f = self._future[i]
        if f is not None:
            t0 = time.perf_counter()
            waited = not f.done()
            try:
                f.result()
            except BaseException:
                self._future[i] = None
                self._drop(i)
                raise
            self._future[i] = None
            tag = self._tag[i]
            if waited:
                self.wait_s += time.perf_counter() - t0
                if tag is not None:
                    self._count(tag[0], 2, time.perf_counter() - t0)
        if self._fresh[i]:
            if self._verify is not None and self._tag[i] is not None:
                try:
                    self._verify(self._tag[i], self.bufs[i])
                except BaseException:
                    self._drop(i)
                    raise
            self._fresh[i] = False
        return self.bufs[i]

    def release(self, held: list[int], after: object | None = None) -> None:
        """Give buffers back; `after` (a CUDA event) marks the copy that still reads them."""
        for i in held:
            if after is not None:
                self._busy[i] = after
            self._pins[i] -= 1
            if self._pins[i] == 0:
                self._free[i] = None
                self._free.move_to_end(i)

    def close(self) -> None:
        """Stop the reader threads and free the buffers (both come back if used again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for i in range(len(self.bufs)):
            self._settle(i)
        for table in (self.bufs, self._tag, self._pins, self._future, self._fresh, self._busy):
            table.clear()
        self._free.clear()
        self._where.clear()
