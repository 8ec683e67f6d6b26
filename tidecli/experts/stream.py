"""Streamed misses: the GPU reads a missed expert from pinned host memory itself, inside the step.

The host-driven runtime (offload.py) stops after every MoE layer's router: the routing goes to
the host, which decides what to copy or compute, and the GPU waits for it. Here the whole step
is device work, captured as one CUDA graph, and the placement lives in device tables:

1. the layer's pairs are looked up in its slot table (expert → slot, -1 when not resident);
2. on a refresh step the experts the step needs and lacks take the slots of residents it does
   not use, least recently used first, as many as there are such slots;
3. one expert pass (qkernel.expert_rows_two) runs the pairs of experts held in a slot from
   device memory and every other pair with its expert's weights read from pinned RAM over
   PCIe; an expert placed in step 2 is written into its slot by the programs that read it, so
   its bytes cross the link once. Experts left without a slot (between refreshes, or when the
   step needs more experts than the layer has slots) are only read. Compressed experts (and
   GPUs without the fused pass) gather the placed rows into their slots with a kernel
   (experts/gather.py) beside a pass over the held slots, then run them in a third pass.
4. optionally (`prefetch`), the next layer's experts are guessed by its router from this
   layer's input and placed ahead, while this layer computes (experts/layerahead.py). Only
   the guesses' cost depends on how good they are.
5. or (`prefetch_steps`) a step's guessed experts are copied into slots by the copy engine
   before the step runs, each layer waiting for its own copies (experts/stepahead.py).

No expert's arithmetic depends on where its weights were read from, so tokens are those of the
all-resident run. Between refreshes (steps t ≢ 0 mod τ) the placement is frozen, as in TIDE;
with τ = 1 every step refreshes and the slots act as an LRU cache kept by the GPU. A layer with
a slot for every expert skips all of this and computes as the resident runtime does. The host
reads the step's counters once, after the decoder's own sync. A policy that places experts on
the host (static) does so between forward passes.

Needs the experts in pinned RAM (not the tiered store), in the model's dtype or a compressed
format's bytes, and on CUDA the Triton compiler (for the gather kernel).
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.experts.compute import grouped_rows, pool_views, row_dtype, run_pairs
from tidecli.experts.formats import compressed_name, is_compressed
from tidecli.experts.fused import LayerPlan, fused_available
from tidecli.experts.gather import copy_rows, device_view
from tidecli.experts.info import RuntimeInfo
from tidecli.experts.layerahead import LayerAhead
from tidecli.experts.placement import place_lru
from tidecli.experts.policies import Policy
from tidecli.experts.pools import PooledRuntime
from tidecli.experts.qkernel import expert_rows_two, plain_rows_available
from tidecli.experts.readahead import ReadAheadGate
from tidecli.experts.stepahead import StepAhead
from tidecli.experts.store import HostExpertStore
from tidecli.model.config import ModelConfig
from tidecli.model.counters import ExpertStats
from tidecli.model.moe import ForwardInfo
from tidecli.model.program import side_stream

# per-layer counters written by the device each forward pass
_HITS, _PLACED, _PLACED_PAIRS, _STREAMED, _STREAMED_PAIRS = range(5)


class StreamRuntime(PooledRuntime):
    needs_host = False

    def __init__(self, cfg: ModelConfig, store: HostExpertStore, budgets: dict[int, int],
                 policy: Policy, *, device: torch.device, dtype: torch.dtype,
                 kernel: str = "auto", prefetch: bool = False,
                 prefetch_steps: bool = False) -> None:
        self._pending = False  # a forward's counters queued, not yet counted (the base's
        # __init__ already sets the stats properties)
        super().__init__(cfg, store, budgets, policy, device=device, dtype=dtype, kernel=kernel)
        m, e = cfg.num_moe_layers, cfg.num_experts
        bmax = max(budgets.values(), default=0)
        self.bmax = bmax
        dev = device
        self.prefetches = prefetch and bmax > 0  # the read-ahead across layers (layerahead.py)
        # the read-ahead between steps may place a whole step's guess at once: judged sooner
        self.ahead_gate = ReadAheadGate(window=2) if prefetch_steps else ReadAheadGate()
        # device truth of the placement; column E (table) and bmax (owner, last) take the
        # writes of entries that place nothing, so every update has a static shape
        self.table = torch.full((m, e + 1), -1, dtype=torch.long, device=dev)
        self.owner = torch.full((m, bmax + 1), -1, dtype=torch.long, device=dev)
        self.last = torch.full((m, bmax + 1), -1, dtype=torch.long, device=dev)
        self.counters = torch.zeros((m, 5), dtype=torch.long, device=dev)
        self._ctr_host = torch.zeros((m, 5), dtype=torch.long, pin_memory=dev.type == "cuda")
        self._ctr_ready = torch.cuda.Event() if dev.type == "cuda" else None
        self.counts = torch.zeros((m, e), dtype=torch.long, device=dev)
        self._keep = torch.zeros((), dtype=torch.long, device=dev)  # 1: this forward refreshes
        self._clock = torch.zeros((), dtype=torch.long, device=dev)
        self._ticks = 0
        self._host = {layer: device_view(store.layers[layer], device) for layer in cfg.moe_layers}
        self._host_views = {layer: pool_views(v, cfg.hidden_size, cfg.moe_intermediate_size,
                                              store.format)
                            for layer, v in self._host.items()}
        self._ar_e = torch.arange(e, device=dev)
        self._ar_b = torch.arange(bmax, device=dev)
        self._last_block: int | None = None
        # one kernel plans each layer (experts/fused.py); the torch ops below are the reference
        self.fused = fused_available(device)
        # placed experts computed as they cross into their slots, in one pass with the held
        # ones (plain experts on CUDA; compressed ones keep a gather and a third pass)
        self.through = self.fused and plain_rows_available(device, dtype) and \
            not is_compressed(store.format)
        self._plans: dict[tuple[int, int], LayerPlan] = {}
        self.expert_bytes = self.pools.expert_bytes
        for j, layer in enumerate(cfg.moe_layers):
            if layer in self.full:  # filled by PooledRuntime: the device tables say so
                self._push_tables(j, self.pools.pools[layer])
        # layers filled with every expert keep them where loading put them (nothing can miss)
        # and compute as resident; a policy that empties the slots each block does not
        self._whole = set() if policy.starts_cold() else set(self.full)
        # read-ahead between steps (experts/stepahead.py): the guessed experts of the next
        # step, copied by the copy engine before it runs
        self.prefetches_steps = prefetch_steps and bmax > 0
        self.ahead = StepAhead(self, np.array(
            [0 if layer in self._whole else self.pools.pools[layer].slots
             for layer in cfg.moe_layers], dtype=np.int64)) if self.prefetches_steps else None
        # read-ahead across layers (experts/layerahead.py): the next layer's guessed experts,
        # placed while this one computes
        self.layer_ahead = LayerAhead(self) if self.prefetches else None

    # ---- forward bookkeeping --------------------------------------------------------------------

    # The forward's counters are read once the host has synced with the device anyway (the
    # decoder reads its tokens after every step): end_forward only queues their copy. Reading
    # them at once made the GPU wait, after every forward, for the host to count them and queue
    # the decoder's next kernels (≈ 1 ms a step of full-size mini, docs/benchmarks.md section
    # 16). Anything that needs them now (a trace, placements made on the host, the read-ahead
    # gate) reads them at once.

    @property
    def forward_stats(self) -> ExpertStats:
        self._settle()
        return self._forward

    @forward_stats.setter
    def forward_stats(self, stats: ExpertStats) -> None:
        self._forward = stats

    @property
    def run_stats(self) -> ExpertStats:
        self._settle()
        return self._run

    @run_stats.setter
    def run_stats(self, stats: ExpertStats) -> None:
        self._run = stats

    def begin_forward(self, info: ForwardInfo) -> None:
        self._settle()
        super().begin_forward(info)
        if info.kind == "step" and info.block != self._last_block:
            self._last_block = info.block
            if self.policy.starts_cold():  # ablation: each block starts with empty slots
                self.table.fill_(-1)
                self.owner.fill_(-1)
                self.last.fill_(-1)
        self._ticks += 1
        # Python scalars: fill kernels, no host-to-device copy to order
        keep = self.policy.stream_keep(info)
        self._keep.fill_(1 if keep else 0)
        self._clock.fill_(self._ticks)
        if self.ahead is not None:
            self.ahead.begin(info, keep and self.ahead_gate.on)
        if self.layer_ahead is not None:
            self.layer_ahead.begin(keep, self.ahead_gate)

    def prefetch_step(self, guess) -> None:
        """Host, before a step's forward runs: `guess()` [M, T, n] its likely experts (or
        None); those without a slot are copied into slots ahead of their layers
        (experts/stepahead.py)."""
        if self.ahead is not None:
            self.ahead.run(guess)

    def end_forward(self):
        if self.ahead is not None:
            self.ahead.after_forward()
        if self._needs_counts() or self.prefetches:
            return self._count(self.counters.cpu().numpy())
        self._ctr_host.copy_(self.counters, non_blocking=True)
        if self._ctr_ready is not None:
            self._ctr_ready.record()
        self._pending = True
        return self._forward  # counted when first asked for

    def _settle(self) -> None:
        """Count the last forward's queued counters (waits for its copy, if still running)."""
        if not self._pending:
            return
        self._pending = False
        if self._ctr_ready is not None:
            self._ctr_ready.synchronize()
        self._count(self._ctr_host.numpy())

    def _count(self, ctr: np.ndarray) -> ExpertStats:
        counts = self.counts.cpu().numpy() if self._needs_counts() else None
        ebytes = self.expert_bytes
        for j, layer in enumerate(self.cfg.moe_layers):
            c = self.forward_stats.layer(layer)
            row = ctr[j]
            c.gpu_hits += int(row[_HITS])
            c.fetched_calls += int(row[_PLACED_PAIRS] + row[_STREAMED_PAIRS])
            c.promotions += int(row[_PLACED])
            c.bytes_h2d += int(row[_PLACED] + row[_STREAMED]) * ebytes
            c.streamed += int(row[_STREAMED])
            if counts is not None and self.trace is not None:
                self._trace_counts[j] = counts[j]
        if self.layer_ahead is not None:
            self.layer_ahead.score(counts, self.forward_stats, self.ahead_gate)
        if self.ahead is not None:
            self.ahead.score(counts, self.forward_stats, self.ahead_gate)
        if counts is not None:
            self._host_placement(counts)
        return super().end_forward()

    def _needs_counts(self) -> bool:
        return self.trace is not None or self.policy.places_on_host(self.info)

    def _host_placement(self, counts: np.ndarray) -> None:
        """Moves the policy makes on the host (static's one-time placement), applied before the
        next forward pass: the host mirror is refreshed, rows copied, device tables rewritten."""
        if not self.policy.places_on_host(self.info):
            return
        self.sync_host_tables()
        for j, layer in enumerate(self.cfg.moe_layers):
            if not self.policy.wants_ids_first(layer, self.info):
                continue
            moves = self.policy.before_compute(layer, counts[j], self.info)
            if not moves:
                continue
            pool = self.pools.pools[layer]
            for s, e in moves:
                pool.assign(s, e)
                pool.buf[s].copy_(self.store.layers[layer][e], non_blocking=True)
            c = self.forward_stats.layer(layer)
            c.promotions += len(moves)
            c.bytes_h2d += len(moves) * self.expert_bytes
            self._push_tables(j, pool)

    def _push_tables(self, j: int, pool) -> None:
        e, b = self.cfg.num_experts, pool.slots
        table = np.full(e + 1, -1, dtype=np.int64)
        table[:e] = pool.slot_of_expert
        owner = np.full(self.bmax + 1, -1, dtype=np.int64)
        owner[:b] = pool.expert_of_slot
        self.table[j].copy_(torch.from_numpy(table))
        self.owner[j].copy_(torch.from_numpy(owner))

    def sync_host_tables(self) -> None:
        """Copy the device placement into the pools' host tables (for inspection and for
        host-side policies); waits for the device."""
        table = self.table.cpu().numpy()
        owner = self.owner.cpu().numpy()
        for j, layer in enumerate(self.cfg.moe_layers):
            pool = self.pools.pools[layer]
            pool.set_tables(table[j, : self.cfg.num_experts], owner[j, : pool.slots])

    def host_after(self, layer, io, pair_out, over, over_mask):
        self._tokens = int(io.ids.shape[0])

    # ---- the device phase -----------------------------------------------------------------------

    def device_begin(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        j = self.layer_index[layer]
        pool = self.pools.pools[layer]
        b, e = pool.slots, self.cfg.num_experts
        flat = ids.reshape(-1)
        if layer in self._whole:
            return self._device_begin_whole(j, pool, hidden, flat)
        if self.ahead is not None:
            self.ahead.wait(j)
        if self.fused and LayerPlan.fits(flat.numel(), e, b):
            return self._device_begin_fused(j, layer, pool, hidden, flat)
        table = self.table[j]
        counts = self.counts[j]
        counts.zero_()
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        used = counts > 0
        slot0 = table[flat]
        placed_n = torch.zeros((), dtype=torch.long, device=flat.device)
        if b > 0:
            placed_n, _ = self._place(j, pool, used)
        slot = table[flat]
        out = run_pairs(self.kernel, hidden, slot, pool.gate_up, pool.down, self.k)
        if b > 0:  # mark the slots this step reads as just used
            self.last[j].index_put_((torch.where(slot >= 0, slot, self.bmax),), self._clock)
        rest = slot < 0
        if self.cuda or bool(rest.any()):
            streamed = self._from_host(layer, hidden, torch.where(rest, flat, -1))
            out = torch.where(rest[:, None], streamed, out)
        missing_after = used & (table[:e] < 0)
        self.counters[j].copy_(torch.stack([
            (slot0 >= 0).sum(), placed_n, ((slot0 < 0) & ~rest).sum(),
            missing_after.sum(), rest.sum()]))
        return out

    def _device_begin_whole(self, j: int, pool, hidden: torch.Tensor,
                            flat: torch.Tensor) -> torch.Tensor:
        """A layer whose slots hold every expert (expert e in slot e since loading) computes as
        the resident runtime does: one grouped pass, nothing to plan, place or read from RAM."""
        counts = self.counts[j]
        counts.zero_()
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        ctr = self.counters[j]
        ctr.zero_()
        ctr[_HITS].fill_(flat.numel())
        return run_pairs(self.kernel, hidden, flat, pool.gate_up, pool.down, self.k)

    def prefetch(self, layer: int, ids: torch.Tensor) -> None:
        """A guess of the layer's experts, before its router runs (experts/layerahead.py)."""
        if self.layer_ahead is not None:
            self.layer_ahead.place(layer, ids)

    def _device_begin_fused(self, j: int, layer: int, pool, hidden: torch.Tensor,
                            flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel()
        lp = self._plans.get((j, n))
        if lp is None:
            lp = self._plans[(j, n)] = LayerPlan(n, self.cfg.num_experts, pool.slots, self.device,
                                                 through=self.through)
        lp.run(flat, self.table[j], self.owner[j], self.last[j], self._keep, self._clock,
               self.counts[j], self.counters[j], self.k)
        if lp.through:
            return self._through(j, layer, pool, hidden, lp)
        # the placed experts' rows cross PCIe on a side stream while the experts already in
        # their slots compute (different slots: victims are never used this forward)
        side = None
        if self.cuda:
            side = side_stream(self.device, "gather")
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                copy_rows(self._host[layer], lp.src, pool.buf, lp.dst)
        else:
            copy_rows(self._host[layer], lp.src, pool.buf, lp.dst)
        out = torch.empty((n + 1, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
        grouped_rows(hidden, lp.prow, lp.pdst, lp.poffs, pool.gate_up, pool.down, out)
        gate_up, down = self._host_views[layer]
        grouped_rows(hidden, lp.hrow, lp.hdst, lp.hoffs, gate_up, down, out, streamed=True)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
        grouped_rows(hidden, lp.qrow, lp.qdst, lp.qoffs, pool.gate_up, pool.down, out)
        return out[:n]

    def _through(self, j: int, layer: int, pool, hidden: torch.Tensor,
                 lp: LayerPlan) -> torch.Tensor:
        """The layer's experts in one two-source pass: held slots from device memory, the
        rest read in place from pinned RAM, the placed ones written into their slots as they
        are read (qkernel.expert_rows_two). Elsewhere (the interpreter tests) the same work in
        three steps: the placed rows copied, then one pass over each source."""
        n = lp.P
        out = torch.empty((n + 1, hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
        if self.cuda:
            expert_rows_two(hidden, lp.rows, lp.dsts, lp.offs, lp.split,
                            (pool.gate_up, pool.down), self._host_views[layer], self.table[j],
                            out)
            return out[:n]
        copy_rows(self._host[layer], lp.src, pool.buf, lp.dst)
        grouped_rows(hidden, lp.prow, lp.pdst, lp.poffs, pool.gate_up, pool.down, out)
        gate_up, down = self._host_views[layer]
        grouped_rows(hidden, lp.hrow, lp.hdst, lp.hoffs, gate_up, down, out, streamed=True)
        return out[:n]

    def _place(self, j: int, pool, used: torch.Tensor,
               keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """On a refresh forward: the used experts without a slot take the slots whose experts
        this step does not use, least recently used first (experts/placement.py), and their
        rows are gathered from pinned RAM. Returns how many were placed (a device scalar) and
        the placed experts by slot rank ([slots], -1 past them)."""
        n_place, src, victims = place_lru(
            self.table[j], self.owner[j], self.last[j], used, slots=pool.slots, bmax=self.bmax,
            keep=self._keep if keep is None else keep, slot_ids=self._ar_b, expert_ids=self._ar_e)
        copy_rows(self._host[pool.layer], src, pool.buf, victims)
        return n_place, src

    def _from_host(self, layer: int, hidden: torch.Tensor,
                   pair_expert: torch.Tensor) -> torch.Tensor:
        """Pairs whose expert has no slot, computed with weights read from pinned RAM."""
        if self.kernel == "grouped_mm":
            gate_up, down = self._host_views[layer]
            return run_pairs(self.kernel, hidden, pair_expert, gate_up, down, self.k,
                             streamed=True)
        # CPU device (or no grouped kernel): the needed rows in the model's dtype (compressed
        # rows as they are), then the loop
        need = torch.unique(pair_expert[pair_expert >= 0])
        rows = self.store.layers[layer][need.cpu()].to(self.device,
                                                       row_dtype(self.format, self.dtype))
        lut = torch.full((self.cfg.num_experts + 1,), -1, dtype=torch.long, device=self.device)
        lut[need] = torch.arange(need.numel(), device=self.device)
        slot = lut[torch.where(pair_expert >= 0, pair_expert, self.cfg.num_experts)]
        gate_up, down = pool_views(rows, self.cfg.hidden_size, self.cfg.moe_intermediate_size,
                                   self.format)
        return run_pairs(self.kernel, hidden, slot, gate_up, down, self.k)

    def describe(self) -> RuntimeInfo:
        ahead = "layer" if self.prefetches else "step" if self.prefetches_steps else "off"
        return RuntimeInfo(**self.policy.describe(), kernel=self.kernel, misses="stream",
                           prefetch=ahead,
                           experts_format=compressed_name(self.format),
                           experts_per_layer=dict(self.budgets), host_store=self.store.info,
                           slot_pool_bytes=self.pools.nbytes(), scratch_bytes=0)

    def reset_stats(self) -> None:
        self._settle()  # a forward before the reset counts before it
        super().reset_stats()

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()  # no copy still reads the store
        self.store.close()
