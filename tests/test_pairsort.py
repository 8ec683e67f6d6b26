"""The pair-sort kernel (experts/pairsort.py) in Triton's interpreter against its torch
reference (a stable argsort): the same order, output rows and group ends, bit for bit."""

import os

import pytest
import torch

if torch.cuda.is_available():  # there the compiled kernel runs, in tests/test_gpu.py
    pytest.skip("the interpreter check is for machines without a GPU", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its library follows the mode
pytest.importorskip("triton")

from tidecli.experts.compute import run_grouped_loop, run_grouped_mm  # noqa: E402
from tidecli.experts.pairsort import (  # noqa: E402
    MAX_PAIRS,
    MAX_SLOTS,
    sort_pairs,
    sort_pairs_reference,  # noqa: E402
)


@pytest.mark.parametrize("pairs,slots,k", [(256, 256, 8), (64, 20, 4), (7, 3, 1),
                                           (MAX_PAIRS, MAX_SLOTS, 8), (40, 0, 2)])
def test_kernel_orders_pairs_as_the_stable_argsort(pairs, slots, k):
    gen = torch.Generator().manual_seed(pairs + slots)
    pair_slot = torch.randint(-1, max(slots, 1), (pairs,), generator=gen)
    if slots == 0:
        pair_slot[:] = -1
    pair_slot[: min(3, pairs)] = -1  # pairs without a slot, first: they must sort last
    got = sort_pairs(pair_slot, slots, k)
    want = sort_pairs_reference(pair_slot, slots, k)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    rows, dst, offs = got
    held = int((pair_slot >= 0).sum())
    assert (dst[held:] == pairs).all() and (rows[held:] == 0).all()
    if slots:
        assert int(offs[-1]) == held


def test_grouped_path_matches_the_loop_with_skipped_pairs():
    """The grouped path (torch reference sort here, the grouped GEMM reference) against the
    per-expert loop: same rows, zero rows for pairs without a slot."""
    gen = torch.Generator().manual_seed(1)
    t, k, h, i, s = 6, 2, 16, 8, 5
    x = torch.randn(t, h, generator=gen)
    gate_up = torch.randn(s, 2 * i, h, generator=gen)
    down = torch.randn(s, h, i, generator=gen)
    pair_slot = torch.randint(-1, s, (t * k,), generator=gen)
    pair_slot[0] = -1
    want = torch.zeros(t * k, h)
    run_grouped_loop(x, pair_slot, gate_up, down, k, want)
    got = run_grouped_mm(x, pair_slot, gate_up, down, k)
    assert torch.equal(got, want)
    assert (got[0] == 0).all()
