"""The offload runtime: slot pools on the GPU, the host store, CPU workers, and a policy.

Per MoE layer and forward pass:
1. `host_before`: promotions copied during the previous step become active (the GPU waits only
   if a copy is still running: that wait is the copy stall); when the policy must promote
   before computing (LRU, a stalling refresh), the routing is read on the host first and the
   promotions are copied and waited for;
2. `device_begin`: the GPU computes every pair whose expert sits in a slot (grouped kernels,
   driven by the device slot table, no host sync);
3. `host_after`: the routing reaches the host (it was copied right after the router, on the
   side); pairs of non-resident experts run on the CPU while the GPU works ("cpu" misses) or
   stream through the slots in rounds ("fetch" misses); their rows go to an override buffer;
   the policy may schedule promotions for the next step, copied in the background;
   experts that live on disk (tiered store) are read by reader threads into the staging ring
   as soon as the misses are known, while the CPU works on the misses already in RAM;
4. `device_end`: override rows replace the zero rows, and rows are weighted and summed in slot
   order, so a token's result does not depend on where its experts ran.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tidecli.experts.compute import run_pairs
from tidecli.experts.cpu import CpuExperts
from tidecli.experts.formats import compressed_name
from tidecli.experts.info import RuntimeInfo
from tidecli.experts.misses import MissSplitter
from tidecli.experts.modes import SCRATCH_SLOTS, MissMode, resolve_misses
from tidecli.experts.policies import Policy
from tidecli.experts.pools import PooledRuntime
from tidecli.experts.store import ExpertSource
from tidecli.model.config import ModelConfig
from tidecli.model.counters import ExpertStats, LayerCounters
from tidecli.model.moe import LayerIO


class OffloadRuntime(PooledRuntime):
    needs_host = True

    def __init__(self, cfg: ModelConfig, store: ExpertSource, budgets: dict[int, int],
                 policy: Policy, *, device: torch.device, dtype: torch.dtype,
                 cpu_threads: int = 0, cpu_mode: str = "intra",
                 cpu_dtype: torch.dtype | None = None,
                 kernel: str = "auto", misses: str | MissMode = MissMode.CPU,
                 scratch_slots: int = SCRATCH_SLOTS) -> None:
        super().__init__(cfg, store, budgets, policy, device=device, dtype=dtype, kernel=kernel)
        if cpu_dtype is None:
            # on a CPU device the "GPU" side computes in the model dtype: match it bitwise
            cpu_dtype = dtype if not self.cuda else torch.bfloat16
        threads = cpu_threads or torch.get_num_threads()
        if cpu_mode == "intra":
            torch.set_num_threads(threads)
        self.cpu = CpuExperts(hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size,
                              dtype=cpu_dtype, threads=threads, mode=cpu_mode, fmt=store.format)
        misses = resolve_misses(misses, cuda=self.cuda,
                                stream_blocker="the host-driven runtime does not stream")
        if policy.miss_mode == "fetch":
            misses = MissMode.CPU  # unused: this policy streams its misses through its own slots
        self.misses = MissSplitter(mode=misses, slots=min(scratch_slots, cfg.num_experts),
                                   row=store.row, hidden=cfg.hidden_size,
                                   inter=cfg.moe_intermediate_size, device=device, dtype=dtype,
                                   kernel=self.kernel, fmt=store.format)
        self._miss_copies: list[tuple[int, int, object, object]] = []  # (layer, experts, a, b)
        self._events: list[tuple[int, object, object]] = []  # (layer, start, end) stalls
        self._stage: dict[str, torch.Tensor] = {}
        self._d2h = torch.cuda.Stream(device=device) if self.cuda else None
        self._layer_state: dict[int, dict] = {}

    # ---- host staging (pinned on CUDA, grown on demand) -----------------------------------------

    def _staging(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._stage.get(name)
        n = int(np.prod(shape))
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1), dtype=dtype, pin_memory=self.cuda)
            self._stage[name] = buf
        return buf[:n].view(shape)

    def make_io(self, ids: torch.Tensor, hidden: torch.Tensor) -> LayerIO:
        """Eager path: queue the routing's copy to the host on a side stream right after the
        router, so it does not wait for expert kernels queued later on the compute stream."""
        if not self.cuda:
            return LayerIO(ids=ids, hidden=hidden)
        routed = torch.cuda.Event()
        routed.record()
        hid = self._staging("ids", tuple(ids.shape), ids.dtype)
        hx = self._staging("x", tuple(hidden.shape), hidden.dtype)
        with torch.cuda.stream(self._d2h):
            self._d2h.wait_event(routed)
            hid.copy_(ids, non_blocking=True)
            hx.copy_(hidden, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._d2h)
        ids.record_stream(self._d2h)
        hidden.record_stream(self._d2h)
        return LayerIO(ids=ids, hidden=hidden, host_ids=hid, host_x=hx, ready=ready)

    def _stall_since(self, layer: int, start: object | None) -> None:
        if start is not None:
            self._events.append((layer, start, self.pools.streams.compute_event()))

    def _promote(self, layer: int, moves: list[tuple[int, int]], c: LayerCounters, *,
                 now: bool) -> None:
        self.pools.copy_in(layer, moves, activate_now=False)
        c.promotions += len(moves)
        c.bytes_h2d += len(moves) * self.pools.expert_bytes
        if now:
            self._stall_since(layer, self.pools.activate(layer))

    # ---- phases ---------------------------------------------------------------------------------

    def host_before(self, layer: int, io: LayerIO) -> None:
        pool = self.pools.pools[layer]
        pol, info = self.policy, self.info
        c = self.forward_stats.layer(layer)
        pol.begin_layer(layer, info)
        if pool.ready is not None or pool.pending:
            self._stall_since(layer, self.pools.activate(layer))
        fetch = pol.miss_mode == "fetch" or info.kind == "prefill"
        decide_first = (fetch and info.kind != "prefill") or pol.wants_ids_first(layer, info)
        st = {"fetch": fetch, "resident_before": None, "counts": None}
        if decide_first:
            host_ids = io.wait()
            counts = np.bincount(host_ids.reshape(-1), minlength=self.cfg.num_experts)
            st["counts"] = counts
            st["resident_before"] = pool.slot_of_expert[host_ids.reshape(-1)] >= 0
            moves = pol.before_compute(layer, counts, info)
            if moves:
                self._promote(layer, moves, c, now=True)
        self._layer_state[layer] = st

    def device_begin(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pool = self.pools.pools[layer]
        pair_slot = pool.table_dev[ids.reshape(-1)]
        return run_pairs(self.kernel, hidden, pair_slot, pool.gate_up, pool.down, self.k)

    def host_after(self, layer: int, io: LayerIO, pair_out: torch.Tensor,
                   over: torch.Tensor | None, over_mask: torch.Tensor | None) -> None:
        pool = self.pools.pools[layer]
        pol, info = self.policy, self.info
        c = self.forward_stats.layer(layer)
        st = self._layer_state.pop(layer)
        self.pools.mark_read(layer)  # copies into these slots must wait for device_begin
        host_ids = io.wait()
        flat = host_ids.reshape(-1)
        counts = st["counts"] if st["counts"] is not None else np.bincount(
            flat, minlength=self.cfg.num_experts)
        self._record_routing(layer, host_ids)
        self._tokens = int(host_ids.shape[0])
        now_resident = pool.slot_of_expert[flat] >= 0
        before = st["resident_before"] if st["resident_before"] is not None else now_resident
        c.gpu_hits += int((before & now_resident).sum())
        c.fetched_calls += int((now_resident & ~before).sum())
        miss = ~now_resident
        if miss.any():
            if st["fetch"] and pool.slots:  # no slot to fetch through: the misses' own path
                self._fetch_rounds(layer, io, miss, over, over_mask, c)
            else:
                self._split_misses(layer, io, miss, over, over_mask, c)
        later = pol.after_compute(layer, counts, info)
        if later:
            self._promote(layer, later, c, now=False)

    # ---- misses ---------------------------------------------------------------------------------

    def _put_rows(self, rows: np.ndarray, values: torch.Tensor, over: torch.Tensor,
                  over_mask: torch.Tensor) -> None:
        """Write override rows (values on the host or the device) without a host sync."""
        if self.cuda and values.device.type == "cpu":
            staged = self._staging("out", tuple(values.shape), values.dtype)
            staged.copy_(values)
            values = staged.to(self.device, non_blocking=True)
        idx = self._staging("rows", (len(rows),), torch.long)
        idx.copy_(torch.from_numpy(rows))
        idx = idx.to(self.device, non_blocking=True) if self.cuda else idx.clone()
        over.index_copy_(0, idx, values.to(over.dtype))
        over_mask.index_fill_(0, idx, True)

    def _split_misses(self, layer: int, io: LayerIO, miss: np.ndarray, over: torch.Tensor,
                      over_mask: torch.Tensor, c: LayerCounters) -> None:
        """The GPU's share is queued first (copies into scratch slots, then its kernel), so it
        runs while the CPU computes the rest."""
        flat = io.wait().reshape(-1)
        experts, tokens = np.unique(flat[miss], return_counts=True)
        gpu, cpu = self.misses.split(experts.tolist(), tokens.tolist())
        if gpu:
            keep = self._keeper(layer, flat) if self.policy.adaptive else None
            n, a, b = self.misses.run_gpu(self.store, layer, gpu, flat, self.k, io.hidden, over,
                                          over_mask, self.pools.streams, keep=keep)
            if keep is not None:
                self.pools.pools[layer].push_table()
                self.pools.mark_read(layer)  # later copies into the pool wait for these
            c.fetched_calls += n
            c.bytes_h2d += len(gpu) * self.pools.expert_bytes
            if a is not None:
                self._miss_copies.append((layer, len(gpu), a, b))
        if cpu:
            t0 = time.perf_counter()
            self._cpu(layer, io, miss & np.isin(flat, cpu), over, over_mask, c)
            self.misses.learn(cpu_ms=(time.perf_counter() - t0) * 1000.0 / len(cpu))

    def _keeper(self, layer: int, flat: np.ndarray):
        """A fetched expert stays: it takes the slot of a resident this step did not use (a
        device-to-device copy of its scratch row), so the next steps hit it: an empty slot
        first, then the least recently used resident (the policy's clock, where it keeps one).
        Not while copies into the pool are in flight (their slots must not be touched)."""
        pool = self.pools.pools[layer]
        if pool.pending or pool.ready is not None:
            return None
        own = pool.expert_of_slot
        slots = np.flatnonzero((own < 0) | ~np.isin(own, flat))
        recency = getattr(self.policy, "last_used", {}).get(layer)
        if recency is not None:  # pop() takes from the end: the empty, then the oldest
            age = np.where(own[slots] < 0, -1, recency[np.maximum(own[slots], 0)])
            slots = slots[np.argsort(-age, kind="stable")]
        free = slots.tolist()

        def keep(e: int, row: torch.Tensor) -> None:
            if not free or pool.slot_of_expert[e] >= 0:
                return
            s = free.pop()
            pool.buf[s].copy_(row)
            pool.assign(s, e)
        return keep

    def _cpu(self, layer: int, io: LayerIO, miss: np.ndarray, over: torch.Tensor,
             over_mask: torch.Tensor, c: LayerCounters) -> None:
        """The missing pairs on the CPU, grouped by expert (tokens ascending)."""
        t0, waited = time.perf_counter(), self.store.disk_wait_s
        k = self.k
        flat = io.wait().reshape(-1)
        pairs = np.nonzero(miss)[0]
        experts = flat[pairs]
        order = np.argsort(experts, kind="stable")
        pairs, experts = pairs[order], experts[order]
        groups = np.split(pairs, np.flatnonzero(np.diff(experts)) + 1)
        ids = [int(flat[g[0]]) for g in groups]
        rows_of = {e: io.host_x[torch.from_numpy(g // k)]
                   for e, g in zip(ids, groups, strict=True)}
        outs: dict[int, torch.Tensor] = {}
        # batches: the RAM rows at once, experts on disk as the staging ring delivers them
        for batch in self.store.batches(layer, ids):
            done = self.cpu.run([(batch.row(e), rows_of[e]) for e in batch.experts])
            outs.update(zip(batch.experts, done, strict=True))
        result = torch.cat([outs[e] for e in ids])
        waited = self.store.disk_wait_s - waited  # counted as disk_wait_ms, not CPU time
        c.cpu_ms += (time.perf_counter() - t0 - waited) * 1000.0
        c.cpu_calls += len(pairs)
        start = self.pools.streams.compute_event()  # the GPU idles from here if it is done
        self._put_rows(pairs, result, over, over_mask)
        self._stall_since(layer, start)

    def _fetch_rounds(self, layer: int, io: LayerIO, miss: np.ndarray, over: torch.Tensor,
                      over_mask: torch.Tensor, c: LayerCounters) -> None:
        """Stream the missing experts through the slots, a pool-full at a time."""
        pool = self.pools.pools[layer]
        flat = io.wait().reshape(-1)
        todo = list(dict.fromkeys(flat[miss].tolist()))
        while todo:
            batch, todo = todo[: pool.slots], todo[pool.slots:]
            self._promote(layer, list(zip(range(pool.slots), batch, strict=False)), c, now=True)
            rows = np.nonzero(np.isin(flat, batch))[0]
            part = self.device_begin(layer, io.hidden, io.ids)
            self.pools.mark_read(layer)
            idx = torch.from_numpy(rows).to(self.device)
            self._put_rows(rows, part.index_select(0, idx), over, over_mask)
            c.fetched_calls += len(rows)

    # ---- bookkeeping ----------------------------------------------------------------------------

    def end_forward(self) -> ExpertStats:
        for layer, ms, _n in self.pools.drain_copy_timing():
            self.forward_stats.layer(layer).copy_ms += ms
        for layer, counts in self.store.drain_counters().items():
            c = self.forward_stats.layer(layer)
            for name, value in counts.items():
                setattr(c, name, getattr(c, name) + value)
        for layer, n, a, b in self._miss_copies:
            b.synchronize()
            ms = a.elapsed_time(b)
            self.misses.learn(fetch_ms=ms / n)
            self.forward_stats.layer(layer).copy_ms += ms
        self._miss_copies.clear()
        for layer, a, b in self._events:
            if a is None:
                continue
            b.synchronize()
            self.forward_stats.layer(layer).stall_ms += a.elapsed_time(b)
        self._events.clear()
        return super().end_forward()

    def describe(self) -> RuntimeInfo:
        return RuntimeInfo(**self.policy.describe(), kernel=self.kernel,
                           experts_format=compressed_name(self.format),
                           experts_per_layer=dict(self.budgets),
                           cpu_dtype=str(self.cpu.dtype).replace("torch.", ""),
                           cpu_threads=self.cpu.threads, cpu_mode=self.cpu.mode,
                           host_store=self.store.info, slot_pool_bytes=self.pools.nbytes(),
                           misses=str(self.misses.mode), scratch_bytes=self.misses.nbytes)

    def close(self) -> None:
        self.cpu.close()
        self.store.close()  # reader threads and files; the store stays usable
