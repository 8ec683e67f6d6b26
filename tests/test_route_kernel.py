"""The group-limited top-k kernel (model/route_kernel.py) in Triton's interpreter against its
torch reference (router.group_topk_reference), ties included, and the reference against the
published recipe (three torch.topk calls) where no ties exist."""

import os

import pytest
import torch

if torch.cuda.is_available():  # there the compiled kernel runs, in tests/test_gpu.py
    pytest.skip("the interpreter check is for machines without a GPU", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its library follows the mode
pytest.importorskip("triton")

from tidecli.model.route_kernel import group_topk_kernel, kernel_fits  # noqa: E402
from tidecli.model.router import group_topk_reference  # noqa: E402


def _published(choice, n_group, topk_group, k):
    """The model's own recipe: top-2 sums per group, top groups, top-k, with torch.topk."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    score = grouped.topk(2, dim=-1).values.sum(dim=-1)
    keep = score.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, keep, True)
    masked = grouped.masked_fill(~mask[..., None], float("-inf")).view(t, e)
    return masked.topk(k, dim=-1, sorted=True).indices


@pytest.mark.parametrize("t,e,n_group,topk_group,k", [
    (32, 256, 8, 4, 8),  # LLaDA2.0-mini / flash
    (5, 16, 4, 2, 4), (4, 8, 4, 2, 2),  # the test models
    (3, 64, 1, 1, 6),  # no group limit
])
def test_kernel_matches_the_reference_ties_included(t, e, n_group, topk_group, k):
    gen = torch.Generator().manual_seed(e + k)
    choice = torch.rand(t, e, generator=gen)
    choice[0, : e // 2] = 0.5  # ties inside and across groups
    if t > 1:
        choice[1] = 0.25  # every score the same: the lowest ids win
    if t > 2:
        choice[2, 1] = float("-inf")
    got = group_topk_kernel(choice, n_group, topk_group, k)
    want = group_topk_reference(choice, n_group, topk_group, k)
    assert got.dtype == torch.long and torch.equal(got, want)
    if t > 1:
        assert got[1].tolist() == list(range(k))


def test_reference_is_the_published_recipe_without_ties():
    gen = torch.Generator().manual_seed(3)
    choice = torch.rand(64, 256, generator=gen)
    assert torch.equal(group_topk_reference(choice, 8, 4, 8), _published(choice, 8, 4, 8))


def test_op_runs_the_reference_where_the_kernel_cannot():
    choice = torch.rand(4, 12)  # 12 experts: not a power of two
    assert not kernel_fits(12, 4) and kernel_fits(256, 8)
    got = torch.ops.tide.group_topk(choice, 4, 2, 3)
    assert torch.equal(got, group_topk_reference(choice, 4, 2, 3))
