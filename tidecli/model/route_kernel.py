"""Group-limited top-k expert choice (LLaDA2.0/2.1) in one GPU kernel.

In torch ops the choice is three top-k calls and the masks between them; on a GPU each top-k is
a gather kernel and a sort kernel, ≈ 0.66 ms of a 6.8 ms resident step of full-size mini
(docs/benchmarks.md, section 14). Here one Triton program per token keeps its scores in
registers: each group's best two, the best `topk_group` groups, then the best k experts inside
them, one maximum at a time. Ties go to the lower index everywhere, as in its torch reference
(`router.group_topk_reference`, a stable sort); tests run the kernel in Triton's interpreter
against it.

router.py wraps it as a custom operator (`tide::group_topk`), so a compiled step (`--compile on`)
calls it as one opaque op; where it cannot run (no Triton, sizes that are not powers of two) the
op runs the torch reference.
"""

from __future__ import annotations

import functools

import torch

from tidecli.model.triton_util import next_pow2

MAX_EXPERTS = 1024


def kernel_fits(num_experts: int, n_group: int) -> bool:
    """Experts and groups the kernel lays out: powers of two, at most MAX_EXPERTS experts."""
    return (num_experts <= MAX_EXPERTS and num_experts == next_pow2(num_experts)
            and n_group == next_pow2(n_group) and num_experts % n_group == 0)


@functools.cache
def _kernel():  # built on first use: Triton is imported only then
    import triton
    import triton.language as tl

    @triton.jit
    def group_topk(choice, ids, E, G: tl.constexpr, GS: tl.constexpr, TOPG: tl.constexpr,
                   K: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, G * GS)
        x = tl.load(choice + t * E + e)
        big = G * GS
        x2 = tl.reshape(x, (G, GS))
        e2 = tl.reshape(e, (G, GS))
        # a group scores its best two (the first maximum taken out, the lowest index of ties)
        m1 = tl.max(x2, 1)
        i1 = tl.min(tl.where(x2 == m1[:, None], e2, big), 1)
        m2 = tl.max(tl.where(e2 == i1[:, None], float("-inf"), x2), 1)
        score = m1 + m2
        # a group's rank: the groups scoring higher, or as high with a lower index
        g = tl.arange(0, G)
        ahead = (score[None, :] > score[:, None]) | (
            (score[None, :] == score[:, None]) & (g[None, :] < g[:, None]))
        keep = tl.sum(ahead.to(tl.int32), 1) < TOPG
        left = tl.reshape(tl.where(keep[:, None], x2, float("-inf")), (G * GS,))
        taken = e < 0
        for r in tl.static_range(K):
            v = tl.max(tl.where(taken, float("-inf"), left), 0)
            i = tl.min(tl.where((~taken) & (left == v), e, big), 0)
            tl.store(ids + t * K + r, i.to(tl.int64))
            taken = taken | (e == i)

    return group_topk


def group_topk_kernel(choice: torch.Tensor, n_group: int, topk_group: int,
                      k: int) -> torch.Tensor:
    """choice [T, E] fp32 (score + bias) → ids [T, k] int64, one program per token."""
    t, e = choice.shape
    choice = choice.contiguous()
    ids = torch.empty((t, k), dtype=torch.long, device=choice.device)
    if t:
        _kernel()[(t,)](choice, ids, e, G=n_group, GS=e // n_group, TOPG=topk_group, K=k,
                        num_warps=2 if e <= 256 else 4)
    return ids
