"""The read-ahead across layers (`--prefetch layer`, streamed misses): a guess of a MoE layer's
experts — its router applied to the layer before's input — placed while that layer computes
(StepProgram queues it on a side stream). On a refresh forward the guessed experts without a
slot are placed as the layer's own routing would place them — into the slots of experts the
guess does not use, least recently used first — and their rows gathered from pinned RAM.
Those slots keep their last-use time, so a wrong guess is the first to go. The layer's own plan
then finds them resident; whatever the guess, it places and computes exactly what its routing
asks for. Only the guesses' cost depends on how good they are: the forward's placements are
read back and scored (experts/readahead.py), and the gate turns the read-ahead off while they
do not pay. The read-ahead between steps is experts/stepahead.py.
"""

from __future__ import annotations

import numpy as np
import torch

from tidecli.experts.fused import LayerPlan
from tidecli.experts.gather import copy_rows
from tidecli.experts.readahead import ReadAheadGate, score_guesses
from tidecli.model.counters import ExpertStats


class LayerAhead:
    def __init__(self, rt) -> None:
        """`rt`: the StreamRuntime whose tables, slots and placement the guesses use."""
        self.rt = rt
        m, e, dev = rt.cfg.num_moe_layers, rt.cfg.num_experts, rt.device
        # the experts a guess placed in each layer this forward (-1: none), read back with the
        # counters to score the guesses
        self.src = torch.full((m, max(rt.bmax, 1)), -1, dtype=torch.long, device=dev)
        self._counts = torch.zeros((m, e), dtype=torch.long, device=dev)  # scratch
        self._ctr = torch.zeros((m, 5), dtype=torch.long, device=dev)  # scratch
        self.plans: dict[tuple[int, int], LayerPlan] = {}
        self._keep = torch.zeros((), dtype=torch.long, device=dev)  # 1: guesses may place
        self.on = False  # the host's copy of _keep for the forward in progress

    def begin(self, keep: bool, gate: ReadAheadGate) -> None:
        """Host, as a forward begins: guesses place only on a refresh forward, gate on."""
        self.on = keep and gate.on
        if self.on:  # otherwise the guesses place nothing: src stays all -1
            self.src.fill_(-1)
        self._keep.fill_(1 if self.on else 0)

    def place(self, layer: int, ids: torch.Tensor) -> None:
        """Device: `ids` [T, k] a guess of MoE layer `layer`'s experts, before its router."""
        rt = self.rt
        j = rt.layer_index[layer]
        pool = rt.pools.pools[layer]
        b, e = pool.slots, rt.cfg.num_experts
        if b == 0 or layer in rt._whole:
            return
        flat = ids.reshape(-1)
        n = flat.numel()
        if rt.fused and LayerPlan.fits(n, e, b):
            lp = self.plans.get((j, n))
            if lp is None:
                lp = self.plans[(j, n)] = LayerPlan(
                    n, e, b, rt.device, src=self.src[j, :b], mark=False)
            lp.run(flat, rt.table[j], rt.owner[j], rt.last[j], self._keep, rt._clock,
                   self._counts[j], self._ctr[j], rt.k)
            copy_rows(rt._host[layer], lp.src, pool.buf, lp.dst)
            return
        # index_fill_ takes the value as a kernel argument: no host copy (captured on a GPU)
        used = torch.zeros(e, dtype=torch.bool, device=flat.device).index_fill_(0, flat, True)
        _, src = rt._place(j, pool, used, keep=self._keep)
        self.src[j, :b].copy_(src)

    def score(self, counts: np.ndarray | None, stats: ExpertStats,
              gate: ReadAheadGate) -> None:
        """Host, after a forward: what the guesses placed and how much of it their layers used
        (`counts` [M, E] the forward's routing counts, read here if None) go into `stats`;
        the gate hears the forward's totals."""
        gate.after_forward(stats, self.on, lambda: score_guesses(
            self.src.cpu().numpy(), self.rt.counts.cpu().numpy() if counts is None else counts,
            self.rt.cfg.moe_layers, stats, self.rt.expert_bytes))
