"""One kernel for a layer's placement decisions (streamed misses), instead of ~80 small ones.

`placement.place_lru` and `run_grouped_mm` spell the per-layer work in torch ops: readable, and
kept as the reference, but each op is a kernel launch (what that cost: docs/benchmarks.md). Here
a single Triton program (one block of threads: a layer has at most a few hundred experts, slots
and pairs) does all of it:

- the experts the layer's pairs use (a histogram), the ones without a slot, and — on a refresh
  forward — their placement into the slots of residents this forward does not use, least
  recently used first: tables updated in place, the (expert, slot) list for the gather kernel;
- each pair's slot after placement, the slots' last use;
- the pairs sorted by slot and by expert with the group ends, ready for grouped GEMMs: over the
  slots whose expert was there before this forward, over the slots placed now (their rows are
  still arriving while the first set computes), and over the experts read in place from pinned
  RAM (invalid entries point at a dummy row); or (`through`) the placed experts' pairs with
  those read in place, for one pass over both sets that fills the placed slots as it reads;
- the layer's counters and routing counts.

Then `compute.grouped_rows` runs one expert group set: gather rows, two grouped GEMMs, scatter back.
Tests run the kernel in Triton's interpreter on the CPU and compare it with the torch path.
"""

from __future__ import annotations

import functools

import torch

from tidecli.model.triton_util import next_pow2, triton_importable

MAX_PAIRS = 1024  # a step's pairs (block × top-k) fit one program; prefill uses the torch path
MAX_GROUPS = 1024  # experts or slots per layer
_KEY = 2048  # pairs are < _KEY: sort keys are group * _KEY + pair


def fused_available(device: torch.device) -> bool:
    """On CUDA with Triton (tests run the kernel on the CPU in Triton's interpreter)."""
    return device.type == "cuda" and triton_importable()


@functools.cache
def _kernel():  # built on first use: Triton is imported only then
    import triton
    import triton.language as tl

    @triton.jit
    def layer_plan(ids, table, owner, last, keep_ptr, clock_ptr, counts,
                   src_out, dst_out, prow, pdst, poffs, qrow, qdst, qoffs, hrow, hdst, hoffs, ctr,
                   scr_used, scr_vic, P, E, B, K,
                   PB: tl.constexpr, EB: tl.constexpr, BB: tl.constexpr, KEY: tl.constexpr,
                   MARK: tl.constexpr, THROUGH: tl.constexpr):
        p = tl.arange(0, PB)
        pm = p < P
        pe = tl.load(ids + p, mask=pm, other=0).to(tl.int32)
        slot0 = tl.load(table + pe, mask=pm, other=-1)
        # experts used this forward (bin E takes the padding lanes)
        ex = tl.arange(0, EB)
        em = ex < E
        cnt = tl.histogram(tl.where(pm, pe, E), EB)
        used = em & (cnt > 0)
        tl.store(counts + ex, cnt.to(tl.int64), mask=em)
        tab = tl.load(table + ex, mask=em, other=0)
        missing = used & (tab < 0)
        n_miss = tl.sum(missing.to(tl.int32), 0)
        rank = tl.cumsum(missing.to(tl.int32), 0) - 1
        tl.store(scr_used + ex, used.to(tl.int32))
        tl.debug_barrier()
        # slots: busy when their expert is used; victims = the others, free ones first, then
        # least recently used
        s = tl.arange(0, BB)
        sm = s < B
        own = tl.load(owner + s, mask=sm, other=-1)
        own_used = tl.load(scr_used + own, mask=sm & (own >= 0), other=0)
        busy = sm & (own >= 0) & (own_used > 0)
        avail = sm & (busy == 0)
        n_avail = tl.sum(avail.to(tl.int32), 0)
        n_place = tl.minimum(n_miss, n_avail) * tl.load(keep_ptr).to(tl.int32)
        lst = tl.load(last + s, mask=sm, other=0)
        big = tl.full([BB], 1 << 40, tl.int64)
        vkey = tl.where(avail, lst + 1, big) * KEY + s.to(tl.int64)
        victims = (tl.sort(vkey, 0) % KEY).to(tl.int32)
        tl.store(scr_vic + s, victims)
        tl.debug_barrier()
        place = missing & (rank < n_place)
        dst = tl.load(scr_vic + rank, mask=place, other=0)
        old = tl.load(owner + dst, mask=place, other=-1)
        tl.store(src_out + rank, ex.to(tl.int64), mask=place)
        tl.store(dst_out + rank, dst.to(tl.int64), mask=place)
        tl.store(src_out + s, tl.full([BB], -1, tl.int64), mask=sm & (s >= n_place))
        tl.store(dst_out + s, s.to(tl.int64), mask=sm & (s >= n_place))
        tl.debug_barrier()  # every load of the old tables is done
        tl.store(table + old, tl.full([EB], -1, tl.int64), mask=place & (old >= 0))
        tl.store(table + ex, dst.to(tl.int64), mask=place)
        tl.store(owner + dst, ex.to(tl.int64), mask=place)
        tl.debug_barrier()
        slot = tl.load(table + pe, mask=pm, other=-1)
        inpool = pm & (slot >= 0)
        if MARK:  # a guess (read-ahead) places without marking: unused, it goes first
            clock = tl.load(clock_ptr)
            tl.store(last + slot, tl.zeros([PB], tl.int64) + clock, mask=inpool)
        # pairs by slot: those whose expert held its slot before this forward (computed while
        # the placed experts arrive), then those placed now; padding lanes sort last
        hit = pm & (slot0 >= 0)
        pk = tl.where(hit, slot.to(tl.int32), tl.where(pm, BB, BB + 1)) * KEY + p
        po = tl.sort(pk, 0) % KEY
        pv = p < tl.sum(hit.to(tl.int32), 0)  # sorted lanes holding a pair of a held slot
        tl.store(prow + p, tl.where(pv, po // K, 0).to(tl.int64), mask=pm)
        tl.store(pdst + p, tl.where(pv, po, P).to(tl.int64), mask=pm)
        pc = tl.cumsum(tl.histogram(tl.where(hit, slot.to(tl.int32), BB - 1), BB), 0)
        tl.store(poffs + s, pc.to(tl.int32), mask=s < tl.maximum(B, 1))
        if THROUGH:  # the placed experts' pairs join those read from RAM (by expert): one
            # pass reads them there and writes their rows into the slots as it goes
            inhost = pm & (slot0 < 0)
        else:
            new = inpool & (slot0 < 0)
            qk = tl.where(new, slot.to(tl.int32), tl.where(pm, BB, BB + 1)) * KEY + p
            qo = tl.sort(qk, 0) % KEY
            qv = p < tl.sum(new.to(tl.int32), 0)
            tl.store(qrow + p, tl.where(qv, qo // K, 0).to(tl.int64), mask=pm)
            tl.store(qdst + p, tl.where(qv, qo, P).to(tl.int64), mask=pm)
            qc = tl.cumsum(tl.histogram(tl.where(new, slot.to(tl.int32), BB - 1), BB), 0)
            tl.store(qoffs + s, qc.to(tl.int32), mask=s < tl.maximum(B, 1))
            inhost = pm & (slot < 0)
        hk = tl.where(inhost, pe, tl.where(pm, EB, EB + 1)) * KEY + p
        ho = tl.sort(hk, 0) % KEY
        hv = p < tl.sum(inhost.to(tl.int32), 0)
        tl.store(hrow + p, tl.where(hv, ho // K, 0).to(tl.int64), mask=pm)
        tl.store(hdst + p, tl.where(hv, ho, P).to(tl.int64), mask=pm)
        hc = tl.cumsum(tl.histogram(tl.where(inhost, pe, E), EB), 0)
        tl.store(hoffs + ex, hc.to(tl.int32), mask=em)
        # counters: hits, placed experts, pairs served by them, experts read in place, pairs
        tl.store(ctr + 0, tl.sum((pm & (slot0 >= 0)).to(tl.int64), 0))
        tl.store(ctr + 1, n_place.to(tl.int64))
        tl.store(ctr + 2, tl.sum((pm & (slot0 < 0) & (slot >= 0)).to(tl.int64), 0))
        tl.store(ctr + 3, (n_miss - n_place).to(tl.int64))
        tl.store(ctr + 4, tl.sum((pm & (slot < 0)).to(tl.int64), 0))

    return layer_plan


class LayerPlan:
    """Static buffers for one layer's fused plan (reused every forward pass).

    The pairs of held slots (`prow`, `pdst`, `poffs`) and those of experts read from pinned RAM
    (`hrow`, `hdst`, `hoffs`) are the two halves of one buffer each (`rows`, `dsts`, `offs`), so
    one two-source pass (qkernel.expert_rows_two) can take both. `through`: the plan puts the
    pairs of the experts it places with those read from RAM, and the q set stays empty — the
    pass that reads them there writes their rows into their slots (no gather, no third pass)."""

    def __init__(self, pairs: int, experts: int, slots: int, device: torch.device, *,
                 src: torch.Tensor | None = None, mark: bool = True,
                 through: bool = False) -> None:
        """`src`: where to write the placed experts (a [slots] long view; default its own);
        `mark=False`: the pairs' slots keep their last-use time (a guess's plan)."""
        self.P, self.E, self.B = pairs, experts, slots
        self.mark, self.through = mark, through
        # spare bins: E for experts, BB-1 (never a slot, nor the first) for slots
        self.PB, self.EB, self.BB = next_pow2(pairs), next_pow2(experts + 1), next_pow2(slots + 2)
        long = dict(dtype=torch.long, device=device)
        self.src = src if src is not None else torch.full((max(slots, 1),), -1, **long)
        self.dst = torch.zeros((max(slots, 1),), **long)
        self.split = max(slots, 1)  # groups before the first expert read from RAM
        self.rows = torch.zeros(2 * pairs, **long)
        self.dsts = torch.zeros(2 * pairs, **long)
        self.offs = torch.zeros(self.split + experts, dtype=torch.int32, device=device)
        self.prow, self.hrow = self.rows[:pairs], self.rows[pairs:]
        self.pdst, self.hdst = self.dsts[:pairs], self.dsts[pairs:]
        self.poffs, self.hoffs = self.offs[: self.split], self.offs[self.split:]
        # the pairs of experts placed this forward, for a third pass (not with `through`,
        # where the plan never writes them: one entry each stands in for the pointers)
        q = 1 if through else pairs
        self.qrow = torch.zeros(q, **long)
        self.qdst = torch.zeros(q, **long)
        self.qoffs = torch.zeros(1 if through else max(slots, 1), dtype=torch.int32,
                                 device=device)
        self.scr_used = torch.zeros(self.EB, dtype=torch.int32, device=device)
        self.scr_vic = torch.zeros(self.BB, dtype=torch.int32, device=device)

    @staticmethod
    def fits(pairs: int, experts: int, slots: int) -> bool:
        return pairs <= MAX_PAIRS and experts < MAX_GROUPS and slots < MAX_GROUPS

    def run(self, flat: torch.Tensor, table: torch.Tensor, owner: torch.Tensor,
            last: torch.Tensor, keep: torch.Tensor, clock: torch.Tensor, counts: torch.Tensor,
            ctr: torch.Tensor, k: int) -> None:
        _kernel()[(1,)](flat, table, owner, last, keep, clock, counts, self.src, self.dst,
                        self.prow, self.pdst, self.poffs, self.qrow, self.qdst, self.qoffs,
                        self.hrow, self.hdst, self.hoffs, ctr,
                        self.scr_used, self.scr_vic, self.P, self.E, self.B, k,
                        PB=self.PB, EB=self.EB, BB=self.BB, KEY=_KEY, MARK=self.mark,
                        THROUGH=self.through)
