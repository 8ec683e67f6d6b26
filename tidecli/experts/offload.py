"""The offload runtime: slot pools on the GPU, the host store, CPU workers, and a policy.

Per MoE layer and forward pass:
1. promotions copied during the previous step become active (the GPU waits only if a copy is
   still running: that wait is the copy stall);
2. the routing goes to the host (ids and the layer input: a few hundred KB);
3. either the GPU starts on the resident experts at once, or — when the policy must promote
   first (LRU, a stalling refresh) — the promotions are copied and waited for;
4. pairs of non-resident experts run on the CPU while the GPU works ("cpu" misses), or stream
   through the slots in rounds ("fetch" misses);
5. the policy may schedule promotions for the next step, copied in the background.
Every pair's output lands in its own row and the rows are summed in slot order, so a token's
result does not depend on where its experts ran.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tidecli.experts.compute import combine, grouped_mm_available, run_grouped_loop, run_grouped_mm
from tidecli.experts.cpu import CpuExperts
from tidecli.experts.policies import Policy, ResidentPolicy
from tidecli.experts.pools import PoolSet
from tidecli.experts.runtime import ExpertRuntime
from tidecli.experts.stats import ExpertStats, LayerCounters
from tidecli.experts.store import HostExpertStore
from tidecli.model.config import ModelConfig


class OffloadRuntime(ExpertRuntime):
    def __init__(self, cfg: ModelConfig, store: HostExpertStore, budgets: dict[int, int],
                 policy: Policy, *, device: torch.device, dtype: torch.dtype,
                 cpu_threads: int = 0, cpu_mode: str = "intra", cpu_dtype: torch.dtype | None = None,
                 kernel: str = "auto") -> None:
        super().__init__(cfg, device, dtype)
        self.name = policy.name
        self.store = store
        self.policy = policy
        self.budgets = budgets
        self.pools = PoolSet(store, budgets, device=device, dtype=dtype)
        policy.attach(self.pools.pools, cfg.num_experts)
        if kernel == "auto":
            kernel = "grouped_mm" if grouped_mm_available(device, dtype) else "loop"
        self.kernel = kernel
        self.cuda = device.type == "cuda"
        if cpu_dtype is None:
            # on a CPU device the "GPU" side computes in the model dtype: match it bitwise
            cpu_dtype = dtype if not self.cuda else torch.bfloat16
        threads = cpu_threads or torch.get_num_threads()
        if cpu_mode == "intra":
            torch.set_num_threads(threads)
        self.cpu = CpuExperts(hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size,
                              dtype=cpu_dtype, threads=threads, mode=cpu_mode)
        self._events: list[tuple[int, str, object, object]] = []  # (layer, what, start, end)
        self._host_ids = self._host_x = self._host_out = self._host_rows = None
        self._d2h = torch.cuda.Stream(device=device) if self.cuda else None
        if isinstance(policy, ResidentPolicy):
            for layer in cfg.moe_layers:
                self.pools.copy_in(layer, policy.initial_moves(layer), activate_now=True)
            self.pools.drain_copy_timing()

    # ---- host staging (pinned on CUDA, grown on demand) -----------------------------------------

    def _staging(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = getattr(self, name)
        n = int(np.prod(shape))
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(max(n, 1), dtype=dtype, pin_memory=self.cuda)
            setattr(self, name, buf)
        return buf[:n].view(shape)

    def _to_host(self, ids: torch.Tensor, hidden: torch.Tensor,
                 routed: torch.cuda.Event | None) -> tuple[np.ndarray, torch.Tensor]:
        """The routing and the layer input on the host (the one sync of the layer).

        The copies run on their own stream after the router, so they do not wait for expert
        kernels already queued on the compute stream.
        """
        if not self.cuda:
            return ids.numpy(), hidden
        hid = self._staging("_host_ids", tuple(ids.shape), ids.dtype)
        hx = self._staging("_host_x", tuple(hidden.shape), hidden.dtype)
        with torch.cuda.stream(self._d2h):
            if routed is not None:
                self._d2h.wait_event(routed)
            hid.copy_(ids, non_blocking=True)
            hx.copy_(hidden, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._d2h)
        ev.synchronize()
        return hid.numpy(), hx

    # ---- pieces ---------------------------------------------------------------------------------

    def _activate(self, layer: int) -> None:
        start = self.pools.activate(layer)
        if start is not None:
            self._events.append((layer, "stall", start, self.pools.streams.compute_event()))

    def _gpu(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
             host_ids: np.ndarray | None, select: np.ndarray | None = None) -> torch.Tensor:
        """Pairs of resident experts on the device; other rows are zero."""
        pool = self.pools.pools[layer]
        k = self.k
        if self.kernel == "grouped_mm" and select is None:
            return run_grouped_mm(hidden, pool.table_dev[ids.reshape(-1)], pool.gate_up,
                                  pool.down, k)
        slots = pool.slot_of_expert[host_ids.reshape(-1)]
        if select is not None:
            slots = np.where(select, slots, -1)
        if self.kernel == "grouped_mm":
            pair_slot = torch.from_numpy(slots).to(self.device, non_blocking=False)
            return run_grouped_mm(hidden, pair_slot, pool.gate_up, pool.down, k)
        out = torch.zeros((ids.numel(), hidden.shape[1]), dtype=hidden.dtype, device=self.device)
        run_grouped_loop(hidden, slots.tolist(), pool.gate_up, pool.down, k, out)
        return out

    def _cpu(self, layer: int, host_ids: np.ndarray, host_x: torch.Tensor, miss: np.ndarray,
             pair_out: torch.Tensor, c: LayerCounters) -> None:
        """Compute the missing pairs on the CPU and put their rows into pair_out."""
        t0 = time.perf_counter()
        k = self.k
        flat = host_ids.reshape(-1)
        pairs = np.nonzero(miss)[0]
        experts = flat[pairs]
        order = np.argsort(experts, kind="stable")  # group by expert, tokens ascending
        pairs, experts = pairs[order], experts[order]
        bounds = np.flatnonzero(np.diff(experts)) + 1
        groups = np.split(pairs, bounds)
        jobs = []
        for g in groups:
            e = int(flat[g[0]])
            jobs.append((self.store.expert(layer, e), host_x[torch.from_numpy(g // k)]))
        outs = self.cpu.run(jobs)
        result = torch.cat(outs).to(pair_out.dtype)
        c.cpu_ms += (time.perf_counter() - t0) * 1000.0
        c.cpu_calls += len(pairs)
        if not self.cuda:
            pair_out[torch.from_numpy(pairs)] = result
            return
        before = self.pools.streams.compute_event()
        staged = self._staging("_host_out", tuple(result.shape), result.dtype)
        staged.copy_(result)
        rows = self._staging("_host_rows", (len(pairs),), torch.long)
        rows.copy_(torch.from_numpy(pairs))
        pair_out.index_copy_(0, rows.to(self.device, non_blocking=True),
                             staged.to(self.device, non_blocking=True))
        self._events.append((layer, "stall", before, self.pools.streams.compute_event()))

    def _fetch_rounds(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
                      host_ids: np.ndarray, miss: np.ndarray, pair_out: torch.Tensor,
                      c: LayerCounters) -> None:
        """Stream the missing experts through the slots, a pool-full at a time."""
        pool = self.pools.pools[layer]
        flat = host_ids.reshape(-1)
        todo = list(dict.fromkeys(flat[miss].tolist()))
        while todo:
            batch, todo = todo[: pool.slots], todo[pool.slots:]
            moves = list(zip(range(pool.slots), batch, strict=False))
            self.pools.copy_in(layer, moves, activate_now=False)
            c.promotions += len(moves)
            c.bytes_h2d += len(moves) * self.pools.expert_bytes
            self._activate(layer)
            select = np.isin(flat, batch)
            part = self._gpu(layer, hidden, ids, host_ids, select)
            pair_out += part  # rows outside `select` are zero in `part` and not yet set here
            self.pools.mark_read(layer)
            c.fetched_calls += int(select.sum())

    # ---- the seam -------------------------------------------------------------------------------

    def run(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
        pool = self.pools.pools[layer]
        pol = self.policy
        c = self.forward_stats.layer(layer)
        info = self.info
        pol.begin_layer(layer, info)
        if pool.ready is not None or pool.pending:
            self._activate(layer)
        fetch = pol.miss_mode == "fetch" or info.kind == "prefill"
        decide_first = (fetch and info.kind != "prefill") or pol.wants_ids_first(layer, info)
        ids_first = fetch or decide_first or self.kernel != "grouped_mm"
        routed = self.pools.streams.compute_event()
        pair_out = None
        if not ids_first:  # the GPU starts on resident experts before the host sees the routing
            pair_out = self._gpu(layer, hidden, ids, None)
        host_ids, host_x = self._to_host(ids, hidden, routed)
        counts = np.bincount(host_ids.reshape(-1), minlength=self.cfg.num_experts)
        self._record_routing(layer, host_ids)
        resident_before = pool.slot_of_expert[host_ids.reshape(-1)] >= 0
        if ids_first:
            moves = pol.before_compute(layer, counts, info) if decide_first else []
            if moves:
                self.pools.copy_in(layer, moves, activate_now=False)
                c.promotions += len(moves)
                c.bytes_h2d += len(moves) * self.pools.expert_bytes
                self._activate(layer)
            pair_out = self._gpu(layer, hidden, ids, host_ids)
        self.pools.mark_read(layer)
        now_resident = pool.slot_of_expert[host_ids.reshape(-1)] >= 0
        c.gpu_hits += int((resident_before & now_resident).sum())
        c.fetched_calls += int((now_resident & ~resident_before).sum())
        miss = ~now_resident
        if miss.any():
            if fetch:
                self._fetch_rounds(layer, hidden, ids, host_ids, miss, pair_out, c)
            else:
                self._cpu(layer, host_ids, host_x, miss, pair_out, c)
        later = pol.after_compute(layer, counts, info)
        if later:
            self.pools.copy_in(layer, later, activate_now=False)
            c.promotions += len(later)
            c.bytes_h2d += len(later) * self.pools.expert_bytes
        return combine(pair_out, weights, hidden.dtype)

    def end_forward(self) -> ExpertStats:
        for layer, ms, _n in self.pools.drain_copy_timing():
            self.forward_stats.layer(layer).copy_ms += ms
        for layer, what, a, b in self._events:
            if a is None:
                continue
            b.synchronize()
            if what == "stall":
                self.forward_stats.layer(layer).stall_ms += a.elapsed_time(b)
        self._events.clear()
        return super().end_forward()

    def describe(self) -> dict:
        return {**self.policy.describe(), "kernel": self.kernel,
                "experts_per_layer": {str(k): v for k, v in self.budgets.items()},
                "cpu_dtype": str(self.cpu.dtype).replace("torch.", ""),
                "cpu_threads": self.cpu.threads, "cpu_mode": self.cpu.mode,
                "host_store": self.store.info.to_dict(),
                "slot_pool_bytes": self.pools.nbytes()}

    def close(self) -> None:
        self.cpu.close()
