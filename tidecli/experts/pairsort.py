"""One kernel that orders a layer's (token, k) pairs by slot for the grouped GEMMs.

`run_grouped_mm`'s torch path orders the pairs with a stable argsort: on a GPU that is a radix
sort in one block of 32 threads, 26 µs per layer for 256 pairs, about 0.55 ms of a 6.8 ms
resident step of full-size mini (docs/benchmarks.md, section 14), plus a histogram, a cumulative
sum and the index arithmetic around it. Here one Triton program does all of it: each pair's key
is slot · KEY + pair, sorted in registers, so the order is exactly the stable argsort's (pairs
of one slot keep their order); pairs without a slot (-1) sort last and point at a dummy row.
Tests run it in Triton's interpreter on the CPU against the torch path.
"""

from __future__ import annotations

import functools

import torch

from tidecli.model.triton_util import next_pow2, triton_importable

MAX_PAIRS = 1024  # a step's pairs (block × top-k) fit one program; prefill uses the torch path
MAX_SLOTS = 1023
_KEY = 2048  # pairs are < _KEY: sort keys are slot * _KEY + pair


def pairsort_fits(device: torch.device, pairs: int, slots: int) -> bool:
    """On CUDA with Triton, for up to MAX_PAIRS pairs and MAX_SLOTS slots."""
    return (device.type == "cuda" and pairs <= MAX_PAIRS and slots <= MAX_SLOTS
            and triton_importable())


@functools.cache
def _kernel():  # built on first use: Triton is imported only then
    import triton
    import triton.language as tl

    @triton.jit
    def pair_sort(slots, rows, dst, offs, P, S, K,
                  PB: tl.constexpr, SB: tl.constexpr, KEY: tl.constexpr):
        p = tl.arange(0, PB)
        pm = p < P
        s = tl.load(slots + p, mask=pm, other=-1).to(tl.int32)
        ok = pm & (s >= 0)
        # slots first, then pairs without one, then the padding lanes
        key = tl.where(ok, s, tl.where(pm, SB, SB + 1)) * KEY + p
        order = tl.sort(key, 0) % KEY
        held = p < tl.sum(ok.to(tl.int32), 0)  # sorted lanes holding a pair with a slot
        tl.store(rows + p, tl.where(held, order // K, 0).to(tl.int64), mask=pm)
        tl.store(dst + p, tl.where(held, order, P).to(tl.int64), mask=pm)
        g = tl.arange(0, SB)
        ends = tl.cumsum(tl.histogram(tl.where(ok, s, SB - 1), SB), 0)  # bin SB-1: no slot
        tl.store(offs + g, ends.to(tl.int32), mask=g < S)

    return pair_sort


def sort_pairs(pair_slot: torch.Tensor, slots: int,
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pair_slot [P] (slot per pair, -1 = none) → (rows [P]: the token row of each pair in slot
    order, dst [P]: where its output goes (P, a dummy row, past the pairs with a slot), offs
    [slots]: the group ends), int64/int64/int32, without a host sync."""
    p = pair_slot.numel()
    rows = torch.empty(p, dtype=torch.long, device=pair_slot.device)
    dst = torch.empty(p, dtype=torch.long, device=pair_slot.device)
    offs = torch.empty(max(slots, 1), dtype=torch.int32, device=pair_slot.device)
    _kernel()[(1,)](pair_slot, rows, dst, offs, p, slots, k,
                    PB=next_pow2(max(p, 2)), SB=next_pow2(slots + 1), KEY=_KEY)
    return rows, dst, offs[:slots]


def sort_pairs_reference(pair_slot: torch.Tensor, slots: int,
                         k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sort_pairs` in torch ops: a stable argsort by slot."""
    p = pair_slot.numel()
    slot = torch.where(pair_slot < 0, slots, pair_slot)
    order = torch.argsort(slot, stable=True)
    held = slot[order] < slots
    rows = torch.where(held, order // k, 0)
    dst = torch.where(held, order, p)
    counts = torch.zeros(slots + 1, dtype=torch.int32, device=slot.device).scatter_add_(
        0, slot, torch.ones_like(slot, dtype=torch.int32))[:slots]
    return rows, dst, torch.cumsum(counts, 0, dtype=torch.int32)
