"""GPU slot pools: per MoE layer a preallocated [B, 3·I·H] buffer and its slot table.

Promotions are async copies from the host store on a dedicated copy stream; a copy into a slot
first waits for the compute that last read that slot, and the compute that first reads the new
expert waits for the copy (events on both sides). Eviction only reuses a slot: the weights are
read-only and the host already holds them (in RAM or in the checkpoint's files), so nothing is
ever copied back. Experts read from disk arrive in batches through the tiered store's staging
ring; each batch's buffers are handed back with the event of the copies that read them. On a CPU
"device" (tests) the same calls run synchronously.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tidecli.experts.compute import pick_kernel, pool_views, row_dtype
from tidecli.experts.formats import ExpertFormat
from tidecli.experts.runtime import BaseRuntime
from tidecli.experts.store import ExpertSource


class Streams:
    """The compute stream, the copy stream and events, or synchronous stand-ins on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.copy = torch.cuda.Stream(device=device)
        else:
            self.copy = None

    def compute_event(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def copy_event(self) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.copy)
        return ev


class SlotPool:
    """One layer's resident experts: `slots` rows on the device, and who sits where."""

    def __init__(self, layer: int, slots: int, num_experts: int, row: int, *,
                 device: torch.device, dtype: torch.dtype, hidden: int, inter: int,
                 fmt: ExpertFormat | None = None) -> None:
        self.layer = layer
        self.slots = slots
        self.buf = torch.empty((max(slots, 1), row), dtype=dtype, device=device)
        self.gate_up, self.down = pool_views(self.buf, hidden, inter, fmt)
        self.expert_of_slot = np.full(slots, -1, dtype=np.int64)  # host truth
        self.slot_of_expert = np.full(num_experts, -1, dtype=np.int64)
        # the placement the device kernels read; updated stream-ordered from a pinned buffer
        self.table_dev = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        pin = device.type == "cuda"
        self._table_host = torch.empty(num_experts, dtype=torch.long, pin_memory=pin)
        self._table_event: torch.cuda.Event | None = None
        self.last_read: torch.cuda.Event | None = None  # compute that last read any slot
        self.ready: torch.cuda.Event | None = None  # copies that the next compute must wait for
        self.pending: list[tuple[int, int]] = []  # (slot, expert) copied but not yet active

    def clear(self) -> None:
        """Forget every resident expert (the slots' bytes stay; they are simply reused)."""
        self.slot_of_expert[:] = -1
        self.expert_of_slot[:] = -1
        self.pending.clear()
        self.push_table()

    def assign(self, slot: int, expert: int) -> None:
        """Expert `expert` now sits in `slot` (host tables only; whoever moved its bytes pushes
        the device table when the move is visible to compute)."""
        old = int(self.expert_of_slot[slot])
        if old >= 0:
            self.slot_of_expert[old] = -1
        self.expert_of_slot[slot] = expert
        self.slot_of_expert[expert] = slot

    def set_tables(self, slot_of_expert: np.ndarray, expert_of_slot: np.ndarray) -> None:
        """Take the placement from elsewhere (a runtime that keeps it on the device)."""
        self.slot_of_expert[:] = slot_of_expert
        self.expert_of_slot[:] = expert_of_slot

    def resident(self) -> set[int]:
        return {int(e) for e in self.expert_of_slot if e >= 0}

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if self.expert_of_slot[s] < 0]

    def push_table(self) -> None:
        """Make the device table match the host one, ordered on the compute stream."""
        if self._table_event is not None:
            self._table_event.synchronize()  # the last upload from this buffer has finished
        self._table_host.copy_(torch.from_numpy(self.slot_of_expert))
        self.table_dev.copy_(self._table_host, non_blocking=True)
        if self.table_dev.is_cuda:
            self._table_event = torch.cuda.Event()
            self._table_event.record()


class PoolSet:
    """All layers' pools plus the copy machinery and its counters."""

    def __init__(self, store: ExpertSource, budgets: dict[int, int], *, device: torch.device,
                 dtype: torch.dtype) -> None:
        cfg = store.cfg
        self.store = store
        self.device = device
        self.streams = Streams(device)
        self.expert_bytes = store.row * store.dtype.itemsize
        fmt = store.format
        dtype = row_dtype(fmt, dtype)  # compressed slots hold the rows' bytes as they are
        self.pools = {layer: SlotPool(layer, budgets[layer], cfg.num_experts, store.row,
                                      device=device, dtype=dtype, hidden=cfg.hidden_size,
                                      inter=cfg.moe_intermediate_size, fmt=fmt)
                      for layer in cfg.moe_layers}
        self._copy_timing: list[tuple[int, object, object, int]] = []  # (layer, start, end, n)

    def nbytes(self) -> int:
        return sum(p.buf.numel() * p.buf.element_size() for p in self.pools.values())

    def copy_in(self, layer: int, moves: list[tuple[int, int]], *, activate_now: bool) -> None:
        """Copy expert e into slot s for each (s, e); the host table changes at once, the
        device table now (`activate_now`, stalling the next compute) or at `activate()`."""
        if not moves:
            return
        pool = self.pools[layer]
        for s, e in moves:
            pool.assign(s, e)
        st = self.streams
        slot_of = {e: s for s, e in moves}
        if st.cuda:
            with torch.cuda.stream(st.copy):
                if pool.last_read is not None:
                    st.copy.wait_event(pool.last_read)  # never overwrite a slot still being read
                for batch in self.store.batches(layer, list(slot_of)):
                    rows = [(slot_of[e], batch.row(e)) for e in batch.experts]  # reads done
                    start = st.copy_event()
                    for s, row in rows:
                        pool.buf[s].copy_(row, non_blocking=True)
                    end = st.copy_event()
                    batch.release_after = end  # the ring reuses these rows only after this
                    self._copy_timing.append((layer, start, end, len(rows)))
                    pool.ready = end
        else:
            for batch in self.store.batches(layer, list(slot_of)):
                rows = [(slot_of[e], batch.row(e)) for e in batch.experts]
                t0 = time.perf_counter()
                for s, row in rows:
                    pool.buf[s].copy_(row)
                self._copy_timing.append((layer, t0, time.perf_counter(), len(rows)))
        if activate_now:
            self.activate(layer)
        else:
            pool.pending.extend(moves)

    def activate(self, layer: int) -> object | None:
        """Let the compute stream use the copied experts. Returns the (start) event for stall
        timing on CUDA."""
        pool = self.pools[layer]
        waited = None
        if pool.ready is not None and self.streams.cuda:
            waited = self.streams.compute_event()
            torch.cuda.current_stream(self.device).wait_event(pool.ready)
        pool.ready = None
        pool.pending.clear()
        pool.push_table()
        return waited

    def mark_read(self, layer: int) -> None:
        """Record that compute reading this layer's slots has been enqueued."""
        if self.streams.cuda:
            self.pools[layer].last_read = self.streams.compute_event()

    def drain_copy_timing(self) -> list[tuple[int, float, int]]:
        """(layer, copy ms, experts) for copies issued since the last call (waits for them)."""
        out = []
        for layer, a, b, n in self._copy_timing:
            if self.streams.cuda:
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                ms = (b - a) * 1000.0
            out.append((layer, ms, n))
        self._copy_timing.clear()
        return out


class PooledRuntime(BaseRuntime):
    """What every runtime with slot pools and a policy starts from: the host store, the pools
    (sized by `budgets`), the policy attached to them, and the expert kernel."""

    def __init__(self, cfg, store: ExpertSource, budgets: dict[int, int], policy, *,
                 device: torch.device, dtype: torch.dtype, kernel: str = "auto") -> None:
        super().__init__(cfg, device, dtype)
        self.name = policy.name
        self.store, self.policy, self.budgets = store, policy, budgets
        self.pools = PoolSet(store, budgets, device=device, dtype=dtype)
        policy.attach(self.pools.pools, cfg.num_experts)
        self.format = store.format
        self.kernel = pick_kernel(kernel, device, dtype, store.format)
        self.cuda = device.type == "cuda"
        # a layer with a slot for every expert starts full: nothing for it to miss
        self.full = [layer for layer, pool in self.pools.pools.items()
                     if pool.slots >= cfg.num_experts]
        for layer in self.full:
            self.pools.copy_in(layer, [(e, e) for e in range(cfg.num_experts)],
                               activate_now=True)
        self.pools.drain_copy_timing()
        # the fill is part of loading: its disk reads are not the first generation's
        store.drain_counters()
