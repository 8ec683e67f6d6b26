"""Misses through GPU scratch slots, and the split between them and the CPU (`--misses gpu`
and `split`, experts/modes.py).

A missed expert can be computed on the CPU (its rows stay in host memory) or copied over PCIe
into a scratch slot and computed by the GPU's own kernel, beside the resident experts. The two
run at the same time, so a layer's misses finish fastest when split so that both sides end
together; which side is cheaper depends on the machine (docs/benchmarks.md), so the costs are
learned online from measured copy and CPU times. The scratch slots never disturb the planned
placement.
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.experts.compute import pool_views, row_dtype, run_pairs
from tidecli.experts.formats import ExpertFormat
from tidecli.experts.modes import MissMode


class MissSplitter:
    def __init__(self, *, mode: MissMode | str, slots: int, row: int, hidden: int, inter: int,
                 device: torch.device, dtype: torch.dtype, kernel: str,
                 fetch_ms: float = 0.15, cpu_ms: float = 0.25,
                 fmt: ExpertFormat | None = None) -> None:
        mode = MissMode(mode)
        if mode not in (MissMode.SPLIT, MissMode.CPU, MissMode.GPU):
            raise ValueError(f"MissSplitter takes a resolved mode, not {mode}")
        self.mode = mode
        self.slots = slots if mode is not MissMode.CPU else 0
        self.device, self.kernel = device, kernel
        self.buf = torch.empty((max(self.slots, 1), row), dtype=row_dtype(fmt, dtype),
                               device=device) \
            if self.slots else None
        self.views = pool_views(self.buf, hidden, inter, fmt) if self.buf is not None else None
        self.fetch_ms, self.cpu_ms = fetch_ms, cpu_ms  # per expert, running estimates
        self.cuda = device.type == "cuda"
        self._host_idx: torch.Tensor | None = None
        self._read: torch.cuda.Event | None = None  # the last kernel reading the scratch slots

    def _index_buffer(self, n: int) -> torch.Tensor:
        """A reusable (pinned on CUDA) int64 host buffer of at least n entries. Reused across
        layers: the next layer's host phase starts only after this layer's uploads ran."""
        if self._host_idx is None or self._host_idx.numel() < n:
            self._host_idx = torch.empty(max(n, 1), dtype=torch.long, pin_memory=self.cuda)
        return self._host_idx

    @property
    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def learn(self, *, fetch_ms: float | None = None, cpu_ms: float | None = None) -> None:
        a = 0.2
        if fetch_ms is not None and fetch_ms > 0:
            self.fetch_ms = (1 - a) * self.fetch_ms + a * fetch_ms
        if cpu_ms is not None and cpu_ms > 0:
            self.cpu_ms = (1 - a) * self.cpu_ms + a * cpu_ms

    def split(self, experts: list[int], tokens: list[int]) -> tuple[list[int], list[int]]:
        """(to the GPU, to the CPU): the experts with the most tokens go to the GPU, as many as
        keep its copies from outlasting the CPU's share."""
        if self.mode is MissMode.CPU or not experts:
            return [], list(experts)
        order = sorted(range(len(experts)), key=lambda i: (-tokens[i], experts[i]))
        if self.mode is MissMode.GPU:
            return [experts[i] for i in order], []
        n = len(experts)
        best_k, best = 0, n * self.cpu_ms
        for k in range(1, n + 1):
            cost = max(k * self.fetch_ms, (n - k) * self.cpu_ms)
            if cost < best:
                best_k, best = k, cost
        gpu = [experts[i] for i in order[:best_k]]
        cpu = [experts[i] for i in order[best_k:]]
        return gpu, cpu

    def run_gpu(self, store, layer: int, experts: list[int], flat: np.ndarray, k: int,
                hidden: torch.Tensor, over: torch.Tensor, over_mask: torch.Tensor,
                streams, keep=None) -> tuple[int, object, object]:
        """Copy `experts` into the scratch slots (rounds of `slots`) and compute their pairs on
        the compute stream; rows land in `over`. `keep(expert, row)`, when given, may move a
        fetched expert into the layer's pool (a device copy) before its scratch slot is reused.
        Returns (pairs, copy start, copy end)."""
        pairs_done = 0
        first = last = None
        copy = streams.copy  # None on the CPU: the copies run in order with the compute
        # one host buffer for every round's (pair, slot) indices, copied in one upload per round
        # at distinct offsets, so no round overwrites an upload still in flight
        host = self._index_buffer(2 * len(flat))
        slot_lut = np.full(int(flat.max()) + 1, -1, dtype=np.int64)
        used = 0
        todo = list(experts)
        while todo:
            group, todo = todo[: self.slots], todo[self.slots:]
            slot_of = {e: s for s, e in enumerate(group)}
            for batch in store.batches(layer, group):
                start, end = self._copy_in(batch, slot_of, copy, streams)
                batch.release_after = end
                first = first if first is not None else start
                last = end
            if copy is not None:  # the scratch GEMM waits for its rows, nothing else does
                torch.cuda.current_stream(self.device).wait_event(last)
            slot_lut[:] = -1
            slot_lut[group] = np.arange(len(group))
            rows = np.nonzero(slot_lut[flat] >= 0)[0]  # pair indices, ascending
            n = len(rows)
            both = host[used: used + 2 * n].view(2, n)
            both[0].copy_(torch.from_numpy(rows))
            both[1].copy_(torch.from_numpy(slot_lut[flat[rows]]))
            used += 2 * n
            both = both.to(self.device, non_blocking=True) if self.cuda else both
            idx, pair_slot = both[0], both[1]
            x = hidden.index_select(0, idx // k)
            gate_up, down = self.views
            out = run_pairs(self.kernel, x, pair_slot, gate_up, down, 1)
            over.index_copy_(0, idx, out.to(over.dtype))
            over_mask.index_fill_(0, idx, True)
            pairs_done += len(rows)
            if keep is not None:
                for e, slot in slot_of.items():
                    keep(e, self.buf[slot])
            # the next copies into the scratch slots wait for this round's reads of them
            self._read = streams.compute_event()
        return pairs_done, first, last

    def _copy_in(self, batch, slot_of: dict[int, int], copy, streams) -> tuple[object, object]:
        """Copy a batch's rows into their scratch slots; on CUDA on the copy stream, so they run
        beside the layer's resident experts (queued before them on the compute stream) instead
        of after them. Returns the copy's (start, end) events (None on the CPU)."""
        if copy is None:
            for e in batch.experts:
                self.buf[slot_of[e]].copy_(batch.row(e))
            return None, None
        with torch.cuda.stream(copy):
            if self._read is not None:
                copy.wait_event(self._read)  # never overwrite a slot a kernel still reads
            start = streams.copy_event()
            for e in batch.experts:
                self.buf[slot_of[e]].copy_(batch.row(e), non_blocking=True)
            end = streams.copy_event()
        return start, end
